//! Mutual TLS between two real endpoints over 127.0.0.1: who is let in,
//! who is refused, and what each side is told.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use transport::endpoint::{
    AcceptError, ConnectError, Endpoint, EndpointConfig, MigrationId, PeerConnection,
};
use transport::identity::{ClusterCa, HostIdentity, HostName, Validity};

fn host(name: &str) -> HostName {
    HostName::new(name).unwrap()
}

fn loopback_config() -> EndpointConfig {
    EndpointConfig::listening_on(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
}

fn valid() -> Validity {
    Validity::for_duration(Duration::from_secs(3600))
}

fn endpoint(identity: &HostIdentity) -> Endpoint {
    Endpoint::bind(&loopback_config(), identity).unwrap()
}

/// Runs one accept on `server` in the background.
fn accept_one(server: &Endpoint) -> tokio::task::JoinHandle<Result<PeerConnection, AcceptError>> {
    let server = server.clone();
    tokio::spawn(async move { server.accept().await.expect("endpoint open") })
}

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("transport=debug")
        .with_test_writer()
        .try_init();
}

#[tokio::test]
async fn mutual_tls_succeeds_and_names_both_hosts() {
    init_tracing();
    let ca = ClusterCa::generate("cluster").unwrap();
    let a = endpoint(&ca.host_identity(&host("node-a"), valid()).unwrap());
    let b = endpoint(&ca.host_identity(&host("node-b"), valid()).unwrap());
    let accepted = accept_one(&b);
    let dialed = a
        .connect(b.local_addr().unwrap(), &host("node-b"))
        .await
        .expect("dial succeeds");
    let accepted = accepted.await.unwrap().expect("accept succeeds");
    assert_eq!(dialed.peer(), &host("node-b"));
    assert_eq!(accepted.peer(), &host("node-a"));

    // The connection carries a migration's streams both ways.
    let id = MigrationId(42);
    let (src, dst) = tokio::join!(dialed.open_migration(id, 3), accepted.accept_migration());
    let (mut src, mut dst) = (src.unwrap(), dst.unwrap());
    assert_eq!(dst.id, id);
    assert_eq!(dst.bulk.len(), 3);
    for (i, tx) in src.bulk.iter_mut().enumerate() {
        tx.write_all(&[i as u8; 100]).await.unwrap();
        tx.finish().unwrap();
    }
    for (i, rx) in dst.bulk.iter_mut().enumerate() {
        // Index order is preserved: stream i carries bytes of value i.
        assert_eq!(rx.read_to_end(1000).await.unwrap(), vec![i as u8; 100]);
    }
    dst.priority_tx.write_all(b"req").await.unwrap();
    let mut req = [0u8; 3];
    src.priority_rx.read_exact(&mut req).await.unwrap();
    assert_eq!(&req, b"req");
    src.control_tx.write_all(b"ctl").await.unwrap();
    let mut ctl = [0u8; 3];
    dst.control_rx.read_exact(&mut ctl).await.unwrap();
    assert_eq!(&ctl, b"ctl");
}

#[tokio::test]
async fn dialing_the_wrong_host_name_is_refused() {
    init_tracing();
    let ca = ClusterCa::generate("cluster").unwrap();
    let a = endpoint(&ca.host_identity(&host("node-a"), valid()).unwrap());
    let b = endpoint(&ca.host_identity(&host("node-b"), valid()).unwrap());
    let _accepted = accept_one(&b);
    let err = a
        .connect(b.local_addr().unwrap(), &host("node-c"))
        .await
        .expect_err("a cert for node-b must not pass as node-c");
    assert!(
        matches!(err, ConnectError::Unauthenticated { ref peer, .. } if peer == &host("node-c")),
        "{err:?}"
    );
}

/// Dials `server` with `client`'s identity and returns what each side got.
async fn dial(
    client: &Endpoint,
    server: &Endpoint,
    name: &str,
    anonymous: bool,
) -> (
    Result<PeerConnection, ConnectError>,
    Result<PeerConnection, AcceptError>,
) {
    let accepted = accept_one(server);
    let addr = server.local_addr().unwrap();
    let dialed = if anonymous {
        client.connect_without_client_cert(addr, &host(name)).await
    } else {
        client.connect(addr, &host(name)).await
    };
    let accepted = tokio::time::timeout(Duration::from_secs(10), accepted)
        .await
        .expect("server decides within 10 s")
        .unwrap();
    (dialed, accepted)
}

#[tokio::test]
async fn client_cert_from_another_ca_is_refused() {
    init_tracing();
    let ca = ClusterCa::generate("cluster").unwrap();
    let rogue_ca = ClusterCa::generate("rogue").unwrap();
    let server = endpoint(&ca.host_identity(&host("node-b"), valid()).unwrap());
    // The intruder trusts the real CA (so it accepts the server) but its own
    // certificate comes from elsewhere.
    let rogue_cert = rogue_ca.issue_host(&host("node-a"), valid()).unwrap();
    let intruder = HostIdentity::from_parts(
        vec![rogue_cert.cert_der().clone()],
        rogue_cert.private_key(),
        ca.cert_der().clone(),
    )
    .unwrap();
    let client = endpoint(&intruder);
    let (dialed, accepted) = dial(&client, &server, "node-b", false).await;
    assert!(
        matches!(dialed, Err(ConnectError::PeerRejected { .. })),
        "{dialed:?}"
    );
    assert!(
        matches!(accepted, Err(AcceptError::Unauthenticated { ref reason, .. }) if reason.to_lowercase().contains("issuer")),
        "{accepted:?}"
    );
}

#[tokio::test]
async fn expired_client_cert_is_refused() {
    init_tracing();
    let ca = ClusterCa::generate("cluster").unwrap();
    let server = endpoint(&ca.host_identity(&host("node-b"), valid()).unwrap());
    let client = endpoint(
        &ca.host_identity(&host("node-a"), Validity::expired())
            .unwrap(),
    );
    let (dialed, accepted) = dial(&client, &server, "node-b", false).await;
    assert!(
        matches!(dialed, Err(ConnectError::PeerRejected { .. })),
        "{dialed:?}"
    );
    assert!(
        matches!(accepted, Err(AcceptError::Unauthenticated { ref reason, .. }) if reason.contains("expired")),
        "{accepted:?}"
    );
}

#[tokio::test]
async fn expired_server_cert_is_refused_by_the_dialer() {
    init_tracing();
    let ca = ClusterCa::generate("cluster").unwrap();
    let server = endpoint(
        &ca.host_identity(&host("node-b"), Validity::expired())
            .unwrap(),
    );
    let client = endpoint(&ca.host_identity(&host("node-a"), valid()).unwrap());
    let (dialed, accepted) = dial(&client, &server, "node-b", false).await;
    assert!(
        matches!(dialed, Err(ConnectError::Unauthenticated { ref reason, .. }) if reason.contains("expired")),
        "{dialed:?}"
    );
    assert!(
        matches!(accepted, Err(AcceptError::PeerRejected { .. })),
        "{accepted:?}"
    );
}

#[tokio::test]
async fn missing_client_cert_is_refused() {
    init_tracing();
    let ca = ClusterCa::generate("cluster").unwrap();
    let server = endpoint(&ca.host_identity(&host("node-b"), valid()).unwrap());
    let client = endpoint(&ca.host_identity(&host("node-a"), valid()).unwrap());
    let (dialed, accepted) = dial(&client, &server, "node-b", true).await;
    assert!(
        matches!(dialed, Err(ConnectError::PeerRejected { .. })),
        "{dialed:?}"
    );
    assert!(
        matches!(accepted, Err(AcceptError::Unauthenticated { .. })),
        "{accepted:?}"
    );
}

#[tokio::test]
async fn server_keeps_accepting_after_a_refusal() {
    init_tracing();
    let ca = ClusterCa::generate("cluster").unwrap();
    let server = endpoint(&ca.host_identity(&host("node-b"), valid()).unwrap());
    let client = endpoint(&ca.host_identity(&host("node-a"), valid()).unwrap());
    let (dialed, _) = dial(&client, &server, "node-b", true).await;
    assert!(dialed.is_err());
    let (dialed, accepted) = dial(&client, &server, "node-b", false).await;
    assert_eq!(dialed.unwrap().peer(), &host("node-b"));
    assert_eq!(accepted.unwrap().peer(), &host("node-a"));
}

/// The send window follows the path: an idle loopback connection drops to
/// the floor within a few tuner ticks; a floor equal to the ceiling keeps
/// the window fixed.
#[tokio::test(start_paused = true)]
async fn an_idle_connection_send_window_falls_to_the_floor() {
    let ca = ClusterCa::generate("cluster").unwrap();
    for fixed in [false, true] {
        let mut config = loopback_config();
        if fixed {
            config.min_send_window = config.send_window;
        }
        let a = Endpoint::bind(
            &config,
            &ca.host_identity(&host("node-a"), valid()).unwrap(),
        )
        .unwrap();
        let b = Endpoint::bind(
            &config,
            &ca.host_identity(&host("node-b"), valid()).unwrap(),
        )
        .unwrap();
        let accepted = accept_one(&b);
        let dialed = a
            .connect(b.local_addr().unwrap(), &host("node-b"))
            .await
            .unwrap();
        let accepted = accepted.await.unwrap().unwrap();
        assert_eq!(dialed.send_window(), config.send_window);
        // Paused clock: five ticks pass at once, with no traffic.
        tokio::time::sleep(transport::endpoint::window::TICK * 5).await;
        let want = if fixed {
            config.send_window
        } else {
            config.min_send_window
        };
        assert_eq!(dialed.send_window(), want, "fixed {fixed}");
        assert_eq!(accepted.send_window(), want, "fixed {fixed}");
    }
}
