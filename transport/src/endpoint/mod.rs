//! The QUIC endpoint of a `migrated` host: one UDP socket that both listens
//! for peers and dials them, with mutual TLS against the cluster CA.
//!
//! Dialing checks the peer's chain and that its certificate names the host
//! we meant to reach; accepting requires a client certificate from the same
//! CA and reads the peer's host name from it. A refused peer gets a TLS
//! alert and nothing else; both sides log the reason and return a typed
//! error.
//!
//! With TLS 1.3 the client finishes its handshake before the server has
//! checked the client certificate, so a dialer would only learn of its
//! refusal later, on some stream. To give the dialer a clear answer, the
//! accepting side admits a verified peer by sending [`ADMISSION`] on the
//! first unidirectional stream it opens; [`Endpoint::connect`] returns only
//! after reading it, or with the refusal.
//!
//! Liveness: both sides send keepalives every `interval`, and a connection
//! with no packet from the peer for `interval x (count + 1)` is closed by
//! quinn's idle timer, which every stream then reports as
//! [`TransportError::PeerLost`].

mod config;
mod error;
mod peer;
pub mod window;

use std::net::SocketAddr;
use std::sync::Arc;

use socket2::{Domain, Protocol, Socket, Type};
use tracing::{info, warn};

pub use config::{EndpointConfig, Keepalive, ALPN, DEFAULT_PORT, MAX_GSO_SAFE_MTU};
pub use error::{AcceptError, BindError, ConnectError, TransportError};
pub use peer::{
    DestinationStreams, MigrationId, PeerConnection, SourceStreams, MAX_BULK_STREAMS,
    PRIORITY_BULK, PRIORITY_CONTROL, PRIORITY_POSTCOPY,
};

use crate::identity::{host_name_of, HostIdentity, HostName};
use error::HandshakeFailure;

/// What an accepting endpoint sends a peer it has verified.
pub const ADMISSION: &[u8; 8] = b"MGADMIT1";

/// A bound QUIC endpoint. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Endpoint {
    quinn: quinn::Endpoint,
    host: HostName,
    keepalive: Keepalive,
    /// Floor and ceiling of every connection's send window.
    send_window: (u64, u64),
    /// Kept for [`Endpoint::connect_without_client_cert`].
    anonymous_client: Arc<quinn::ClientConfig>,
}

impl Endpoint {
    /// Binds the UDP socket on `config.listen` and starts listening.
    /// Must be called inside a tokio runtime.
    pub fn bind(config: &EndpointConfig, identity: &HostIdentity) -> Result<Self, BindError> {
        let transport = config.transport()?;
        let server = config::server_config(identity, transport.clone())?;
        let client = config::client_config(identity, transport.clone(), false)?;
        let anonymous = config::client_config(identity, transport, true)?;
        let socket = udp_socket(config.listen, config.socket_buffer).map_err(|source| {
            BindError::Socket {
                addr: config.listen,
                source,
            }
        })?;
        let mut endpoint_config = quinn::EndpointConfig::default();
        // What we advertise we can receive; quinn's default (1472) would cap
        // the peer's packets whatever the MTU settings say.
        endpoint_config
            .max_udp_payload_size(config.max_mtu.max(config.initial_mtu).max(1200))
            .map_err(BindError::Mtu)?;
        let mut quinn = quinn::Endpoint::new(
            endpoint_config,
            Some(server),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|source| BindError::Socket {
            addr: config.listen,
            source,
        })?;
        quinn.set_default_client_config(client);
        info!(host = %identity.host(), addr = ?quinn.local_addr().ok(), "migration endpoint listening");
        Ok(Self {
            quinn,
            host: identity.host().clone(),
            keepalive: config.keepalive,
            send_window: (config.min_send_window, config.send_window),
            anonymous_client: Arc::new(anonymous),
        })
    }

    /// The bound address (useful after binding port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.quinn.local_addr()
    }

    /// This host's name.
    pub fn host(&self) -> &HostName {
        &self.host
    }

    /// Dials `peer` at `addr`, authenticates both sides and waits to be
    /// admitted.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        peer: &HostName,
    ) -> Result<PeerConnection, ConnectError> {
        let connecting = self.quinn.connect(addr, peer.as_str());
        self.finish_connect(connecting, addr, peer).await
    }

    /// Dials without presenting a client certificate. Exists only so tests
    /// can check that peers refuse anonymous clients.
    #[doc(hidden)]
    pub async fn connect_without_client_cert(
        &self,
        addr: SocketAddr,
        peer: &HostName,
    ) -> Result<PeerConnection, ConnectError> {
        let connecting =
            self.quinn
                .connect_with((*self.anonymous_client).clone(), addr, peer.as_str());
        self.finish_connect(connecting, addr, peer).await
    }

    /// Completes a dial that quinn started (or refused to start).
    async fn finish_connect(
        &self,
        connecting: Result<quinn::Connecting, quinn::ConnectError>,
        addr: SocketAddr,
        peer: &HostName,
    ) -> Result<PeerConnection, ConnectError> {
        let connecting = connecting.map_err(|source| ConnectError::Start {
            peer: peer.clone(),
            addr,
            source,
        })?;
        let refused = |e: quinn::ConnectionError| {
            let error = match HandshakeFailure::classify(e) {
                HandshakeFailure::WeRefused { reason } => ConnectError::Unauthenticated {
                    peer: peer.clone(),
                    addr,
                    reason,
                },
                HandshakeFailure::TheyRefused { alert, reason } => ConnectError::PeerRejected {
                    peer: peer.clone(),
                    addr,
                    alert,
                    reason,
                },
                HandshakeFailure::Other(source) => ConnectError::Handshake {
                    peer: peer.clone(),
                    addr,
                    source,
                },
            };
            warn!(%peer, %addr, error = %error, "connection to peer failed");
            error
        };
        let conn = connecting.await.map_err(refused)?;
        // rustls already checked that the certificate is valid for `peer`;
        // reading the name back confirms the certificate is one of ours.
        let named = peer_host(&conn).map_err(|source| ConnectError::PeerName {
            peer: peer.clone(),
            addr,
            source,
        })?;
        if &named != peer {
            // A certificate with several SANs: the one we dialed was checked.
            warn!(%peer, first_san = %named, "peer certificate names several hosts");
        }
        self.await_admission(&conn).await.map_err(|e| match e {
            AdmissionError::Connection(e) => refused(e),
            AdmissionError::Bad(source) => ConnectError::Handshake {
                peer: peer.clone(),
                addr,
                source,
            },
        })?;
        info!(%peer, %addr, "connected to peer");
        Ok(PeerConnection::new(conn, peer.clone(), self.send_window))
    }

    async fn await_admission(&self, conn: &quinn::Connection) -> Result<(), AdmissionError> {
        let window = self.keepalive.window();
        let read = async {
            let mut stream = conn
                .accept_uni()
                .await
                .map_err(AdmissionError::Connection)?;
            let mut buf = [0u8; ADMISSION.len()];
            stream.read_exact(&mut buf).await.map_err(|e| match e {
                quinn::ReadExactError::ReadError(quinn::ReadError::ConnectionLost(e)) => {
                    AdmissionError::Connection(e)
                }
                other => AdmissionError::Bad(other.into()),
            })?;
            if &buf != ADMISSION {
                return Err(AdmissionError::Bad(TransportError::BadStream {
                    what: "bad admission",
                }));
            }
            Ok(())
        };
        match tokio::time::timeout(window, read).await {
            Ok(result) => result,
            Err(_) => Err(AdmissionError::Connection(quinn::ConnectionError::TimedOut)),
        }
    }

    /// Waits for the next peer and authenticates it. `None` once the
    /// endpoint is closed. An error concerns that one peer only (it has been
    /// logged); keep accepting.
    pub async fn accept(&self) -> Option<Result<PeerConnection, AcceptError>> {
        let incoming = self.quinn.accept().await?;
        let addr = incoming.remote_address();
        Some(self.admit(incoming, addr).await)
    }

    async fn admit(
        &self,
        incoming: quinn::Incoming,
        addr: SocketAddr,
    ) -> Result<PeerConnection, AcceptError> {
        let conn = incoming.await.map_err(|e| {
            let error = match HandshakeFailure::classify(e) {
                HandshakeFailure::WeRefused { reason } => {
                    AcceptError::Unauthenticated { addr, reason }
                }
                HandshakeFailure::TheyRefused { alert, reason } => AcceptError::PeerRejected {
                    addr,
                    alert,
                    reason,
                },
                HandshakeFailure::Other(source) => AcceptError::Handshake { addr, source },
            };
            warn!(%addr, error = %error, "refused incoming peer");
            error
        })?;
        let peer = peer_host(&conn).map_err(|source| {
            warn!(%addr, error = %source, "refused incoming peer");
            conn.close(quinn::VarInt::from_u32(1), b"certificate names no host");
            AcceptError::PeerName { addr, source }
        })?;
        let admit = async {
            let mut stream = conn.open_uni().await?;
            stream.write_all(ADMISSION).await?;
            stream.finish()?;
            Ok::<_, TransportError>(())
        };
        admit
            .await
            .map_err(|source| AcceptError::Handshake { addr, source })?;
        info!(%peer, %addr, "accepted peer");
        Ok(PeerConnection::new(conn, peer, self.send_window))
    }

    /// Closes every connection and stops listening.
    pub fn close(&self) {
        self.quinn
            .close(quinn::VarInt::from_u32(0), b"endpoint closing");
    }

    /// Waits until every connection has been closed cleanly.
    pub async fn wait_idle(&self) {
        self.quinn.wait_idle().await;
    }
}

enum AdmissionError {
    Connection(quinn::ConnectionError),
    Bad(TransportError),
}

fn peer_host(conn: &quinn::Connection) -> Result<HostName, crate::identity::PeerNameError> {
    let chain = conn
        .peer_identity()
        .and_then(|id| {
            id.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                .ok()
        })
        .ok_or(crate::identity::PeerNameError::NoDnsName)?;
    let leaf = chain
        .first()
        .ok_or(crate::identity::PeerNameError::NoDnsName)?;
    host_name_of(leaf)
}

/// A UDP socket with large buffers: at multi-Gbit/s the default 208 KiB
/// receive buffer overflows between two reads and throughput collapses.
fn udp_socket(addr: SocketAddr, buffer: usize) -> std::io::Result<std::net::UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_recv_buffer_size(buffer)?;
    socket.set_send_buffer_size(buffer)?;
    // Linux reports twice the granted size (bookkeeping overhead included).
    let mut granted = socket.recv_buffer_size()? / 2;
    if granted < buffer {
        // With CAP_NET_ADMIN the rmem_max cap can be overridden; without
        // it this fails and we keep what we got.
        use nix::sys::socket::{setsockopt, sockopt};
        if setsockopt(&socket, sockopt::RcvBufForce, &buffer).is_ok() {
            let _ = setsockopt(&socket, sockopt::SndBufForce, &buffer);
            granted = socket.recv_buffer_size()? / 2;
        }
    }
    if granted < buffer {
        warn!(
            requested = buffer,
            granted, "udp receive buffer capped by net.core.rmem_max; raise it for full speed"
        );
    }
    socket.bind(&addr.into())?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}
