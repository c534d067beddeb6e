//! Endpoint settings and how they map onto quinn and rustls.
//!
//! Throughput on a migration link is bound by per-packet CPU work, so the
//! defaults favour big packets and big windows (measured with quinn 0.11 on
//! loopback, see the crate's bench): 1452-byte packets cost ~3.2 CPU-s/GiB;
//! ~6000-byte packets with GSO roughly double throughput. Above ~6500 bytes
//! GSO batches exceed what the kernel takes (EMSGSIZE) and MTU discovery
//! falls back to 1200, so MTU discovery is capped at [`MAX_GSO_SAFE_MTU`].

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, MtuDiscoveryConfig, TransportConfig, VarInt};
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

use super::error::BindError;
use crate::identity::HostIdentity;

/// ALPN name of the migration protocol; a peer speaking anything else is
/// refused during the handshake.
pub const ALPN: &[u8] = b"migrated/1";

/// Default UDP port of the migration endpoint.
pub const DEFAULT_PORT: u16 = 7420;

/// Largest UDP payload that still works with GSO batching on Linux.
pub const MAX_GSO_SAFE_MTU: u16 = 6000;

/// Liveness checking of a peer (libvirt's keepalive_interval/count).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// How often a silent connection sends a ping.
    pub interval: Duration,
    /// How many intervals may pass unanswered before the peer is dead.
    pub count: u32,
}

impl Default for Keepalive {
    /// 5 s x 5, as libvirt.
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(5),
            count: 5,
        }
    }
}

impl Keepalive {
    /// Silence after which the peer is declared lost: interval x (count + 1).
    pub fn window(&self) -> Duration {
        self.interval.saturating_mul(self.count.saturating_add(1))
    }
}

/// Everything configurable about an endpoint.
#[derive(Debug, Clone)]
pub struct EndpointConfig {
    /// UDP address to listen on (and dial from).
    pub listen: SocketAddr,
    /// Peer liveness.
    pub keepalive: Keepalive,
    /// UDP payload size used from the first packet. 1452 fits a 1500-byte
    /// Ethernet MTU with IPv6; raise it on jumbo-frame or loopback links.
    pub initial_mtu: u16,
    /// Upper bound for path MTU discovery; it probes up from `initial_mtu`.
    pub max_mtu: u16,
    /// Payload size the network is known to carry (at least 1200). Losses
    /// of packets no larger than this never count as an MTU black hole;
    /// otherwise congestion losses on a fast link can make quinn fall back
    /// to 1200-byte packets for a minute.
    pub guaranteed_mtu: u16,
    /// Bytes a peer may have in flight on one stream.
    pub stream_receive_window: u32,
    /// Bytes a peer may have in flight on the whole connection.
    pub connection_receive_window: u32,
    /// Bytes we buffer for sending across all streams, at most. The window
    /// in use follows the path between `min_send_window` and this (see
    /// `endpoint::window`); set both equal for a fixed window.
    pub send_window: u64,
    /// The send window's floor: what a short path (loopback, one switch)
    /// gets.
    pub min_send_window: u64,
    /// SO_RCVBUF / SO_SNDBUF requested for the UDP socket (the kernel caps
    /// them at net.core.rmem_max / wmem_max; we log when it does).
    pub socket_buffer: usize,
    /// Streams of each direction a peer may open at once (each migration
    /// uses 2 bidirectional + N unidirectional).
    pub max_concurrent_streams: u32,
}

impl Default for EndpointConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from((Ipv4Addr::UNSPECIFIED, DEFAULT_PORT)),
            keepalive: Keepalive::default(),
            initial_mtu: 1452,
            max_mtu: MAX_GSO_SAFE_MTU,
            guaranteed_mtu: 1200,
            stream_receive_window: 16 * 1024 * 1024,
            connection_receive_window: 64 * 1024 * 1024,
            send_window: 64 * 1024 * 1024,
            min_send_window: 4 * 1024 * 1024,
            socket_buffer: 8 * 1024 * 1024,
            max_concurrent_streams: 256,
        }
    }
}

impl EndpointConfig {
    /// Defaults for an endpoint on `listen`.
    pub fn listening_on(listen: SocketAddr) -> Self {
        Self {
            listen,
            ..Self::default()
        }
    }

    /// Uses the GSO-safe packet size from the first packet and never falls
    /// back from it: for loopback and jumbo-frame migration networks, where
    /// that size is known to pass.
    pub fn with_large_mtu(mut self) -> Self {
        self.initial_mtu = MAX_GSO_SAFE_MTU;
        self.max_mtu = MAX_GSO_SAFE_MTU;
        self.guaranteed_mtu = MAX_GSO_SAFE_MTU;
        self
    }

    pub(crate) fn transport(&self) -> Result<Arc<TransportConfig>, BindError> {
        let mut t = TransportConfig::default();
        // Both sides ping at `interval`; quinn declares the connection dead
        // after the idle timeout (the smaller of the two peers' values).
        t.keep_alive_interval(Some(self.keepalive.interval));
        let idle = IdleTimeout::try_from(self.keepalive.window()).map_err(BindError::Keepalive)?;
        t.max_idle_timeout(Some(idle));
        t.stream_receive_window(VarInt::from_u32(self.stream_receive_window));
        t.receive_window(VarInt::from_u32(self.connection_receive_window));
        t.send_window(self.send_window);
        t.max_concurrent_bidi_streams(VarInt::from_u32(self.max_concurrent_streams));
        t.max_concurrent_uni_streams(VarInt::from_u32(self.max_concurrent_streams));
        let guaranteed = self.guaranteed_mtu.max(1200);
        let initial = self.initial_mtu.max(guaranteed);
        t.min_mtu(guaranteed);
        t.initial_mtu(initial);
        let mut mtu = MtuDiscoveryConfig::default();
        mtu.upper_bound(self.max_mtu.max(initial));
        t.mtu_discovery_config(Some(mtu));
        t.enable_segmentation_offload(true);
        Ok(Arc::new(t))
    }
}

/// The crypto provider for TLS: ring (AES-GCM with VAES/AVX2 where the
/// CPU has it). aws-lc-rs, measured with `transport_bench` on the dev
/// machine: raw quinn ~10% faster, the page protocol within noise (-3% to
/// +5%), so not worth building a C library for.
pub(crate) fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(identity: &HostIdentity) -> Result<Arc<RootCertStore>, BindError> {
    let mut roots = RootCertStore::empty();
    roots
        .add(identity.trust_anchor().clone())
        .map_err(BindError::Tls)?;
    Ok(Arc::new(roots))
}

/// Server side: present our certificate, require and verify the client's
/// against the cluster CA.
pub(crate) fn server_config(
    identity: &HostIdentity,
    transport: Arc<TransportConfig>,
) -> Result<quinn::ServerConfig, BindError> {
    let provider = crypto_provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(identity)?, provider.clone())
        .build()
        .map_err(BindError::Verifier)?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(BindError::Tls)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain().to_vec(), identity.key().clone_key())
        .map_err(BindError::Tls)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicServerConfig::try_from(tls).map_err(BindError::Quic)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(transport);
    Ok(config)
}

/// Client side: verify the server's chain and host name against the
/// cluster CA; present our certificate unless `anonymous` (tests only).
pub(crate) fn client_config(
    identity: &HostIdentity,
    transport: Arc<TransportConfig>,
    anonymous: bool,
) -> Result<quinn::ClientConfig, BindError> {
    let builder = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(BindError::Tls)?
        .with_root_certificates(roots(identity)?);
    let mut tls = if anonymous {
        builder.with_no_client_auth()
    } else {
        builder
            .with_client_auth_cert(identity.chain().to_vec(), identity.key().clone_key())
            .map_err(BindError::Tls)?
    };
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicClientConfig::try_from(tls).map_err(BindError::Quic)?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(transport);
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keepalive_window_is_interval_times_count_plus_one() {
        assert_eq!(Keepalive::default().window(), Duration::from_secs(30));
        let k = Keepalive {
            interval: Duration::from_millis(200),
            count: 3,
        };
        assert_eq!(k.window(), Duration::from_millis(800));
    }

    #[test]
    fn absurd_keepalive_is_refused() {
        let mut cfg = EndpointConfig::default();
        cfg.keepalive.interval = Duration::from_secs(u64::MAX / 4);
        assert!(matches!(cfg.transport(), Err(BindError::Keepalive(_))));
    }
}
