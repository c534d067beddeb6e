//! This host on the migration network: the QUIC endpoint (mutual TLS with
//! the daemon's identity from `[tls]`) and one reused connection per peer
//! from `[peers]`.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::Duration;

use tokio::sync::Mutex;
use transport::endpoint::{ConnectError, Endpoint, PeerConnection};
use transport::identity::{HostName, InvalidHostName};

/// How long dialing a peer (resolve, QUIC and TLS handshakes, admission)
/// may take before the migration fails: an unreachable peer must fail
/// fast, not after the keepalive window.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A peer could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum ConnectPeerError {
    #[error("unknown peer {peer}: not under [peers] in the config")]
    Unknown { peer: String },
    #[error("peer name {peer} is not a valid host name")]
    Name {
        peer: String,
        #[source]
        source: InvalidHostName,
    },
    #[error("cannot resolve peer {peer} address {address}")]
    Resolve {
        peer: String,
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("peer {peer} at {addr} did not complete the handshake within {timeout:?}")]
    Timeout {
        peer: String,
        addr: SocketAddr,
        timeout: Duration,
    },
    #[error("cannot connect to peer {peer}")]
    Connect {
        peer: String,
        #[source]
        source: ConnectError,
    },
}

/// The endpoint and the live connections to peers.
#[derive(Debug)]
pub struct Peers {
    endpoint: Endpoint,
    addresses: BTreeMap<String, String>,
    connections: Mutex<HashMap<String, PeerConnection>>,
}

impl Peers {
    pub fn new(endpoint: Endpoint, addresses: BTreeMap<String, String>) -> Self {
        Self {
            endpoint,
            addresses,
            connections: Mutex::new(HashMap::new()),
        }
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The open connection to `peer`, dialing it if there is none (or the
    /// last one closed).
    pub async fn connect(&self, peer: &str) -> Result<PeerConnection, ConnectPeerError> {
        let mut conns = self.connections.lock().await;
        if let Some(c) = conns.get(peer) {
            if c.quinn().close_reason().is_none() {
                return Ok(c.clone());
            }
            conns.remove(peer);
        }
        let address = self
            .addresses
            .get(peer)
            .ok_or_else(|| ConnectPeerError::Unknown { peer: peer.into() })?;
        let name = HostName::new(peer).map_err(|source| ConnectPeerError::Name {
            peer: peer.into(),
            source,
        })?;
        let resolve_err = |source| ConnectPeerError::Resolve {
            peer: peer.into(),
            address: address.clone(),
            source,
        };
        let addr = tokio::net::lookup_host(address.as_str())
            .await
            .map_err(resolve_err)?
            .next()
            .ok_or_else(|| {
                resolve_err(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no address",
                ))
            })?;
        let conn = tokio::time::timeout(CONNECT_TIMEOUT, self.endpoint.connect(addr, &name))
            .await
            .map_err(|_| ConnectPeerError::Timeout {
                peer: peer.into(),
                addr,
                timeout: CONNECT_TIMEOUT,
            })?
            .map_err(|source| ConnectPeerError::Connect {
                peer: peer.into(),
                source,
            })?;
        conns.insert(peer.into(), conn.clone());
        Ok(conn)
    }
}
