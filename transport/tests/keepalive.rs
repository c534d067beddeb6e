//! Keepalive over real UDP: a proxy between two endpoints can blackhole all
//! traffic. An outage shorter than the keepalive window must not disturb a
//! transfer; a longer one must end every stream with `PeerLost`, not before
//! the window and not much after it.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use transport::endpoint::{
    Endpoint, EndpointConfig, Keepalive, MigrationId, PeerConnection, TransportError,
};
use transport::identity::{ClusterCa, Validity};

mod common;
use common::{host, Proxy};

const KEEPALIVE: Keepalive = Keepalive {
    interval: Duration::from_millis(200),
    count: 3,
};
/// Generous on purpose: the box is a shared 2-core machine.
const UPPER_SLACK: Duration = Duration::from_millis(1500);

/// Two endpoints with short keepalive settings, connected through a proxy.
async fn connected_pair() -> (Proxy, PeerConnection, PeerConnection, Vec<Endpoint>) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("transport=debug")
        .with_test_writer()
        .try_init();
    let ca = ClusterCa::generate("cluster").unwrap();
    let validity = Validity::for_duration(Duration::from_secs(3600));
    let mut config = EndpointConfig::listening_on(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
    config.keepalive = KEEPALIVE;
    let a = Endpoint::bind(
        &config,
        &ca.host_identity(&host("node-a"), validity).unwrap(),
    )
    .unwrap();
    let b = Endpoint::bind(
        &config,
        &ca.host_identity(&host("node-b"), validity).unwrap(),
    )
    .unwrap();
    let proxy = Proxy::start(b.local_addr().unwrap()).await;
    let server = b.clone();
    let accepted = tokio::spawn(async move { server.accept().await.unwrap().unwrap() });
    let dialed = a.connect(proxy.addr, &host("node-b")).await.unwrap();
    let accepted = accepted.await.unwrap();
    (proxy, dialed, accepted, vec![a, b])
}

const CHUNK: usize = 64 * 1024;

fn chunk_of(i: usize) -> Vec<u8> {
    (0..CHUNK).map(|j| (i * 31 + j) as u8).collect()
}

/// Sends `chunks` 64 KiB chunks, pausing between them so the transfer spans
/// the outage, then finishes the stream.
async fn send_paced(
    mut tx: quinn::SendStream,
    chunks: usize,
    pause: Duration,
) -> Result<(), TransportError> {
    for i in 0..chunks {
        tx.write_all(&chunk_of(i)).await?;
        tokio::time::sleep(pause).await;
    }
    tx.finish()?;
    Ok(())
}

async fn receive_all(mut rx: quinn::RecvStream, chunks: usize) -> Result<(), TransportError> {
    let mut buf = vec![0u8; CHUNK];
    for i in 0..chunks {
        rx.read_exact(&mut buf).await?;
        assert!(buf == chunk_of(i), "chunk {i} corrupted");
    }
    Ok(())
}

#[tokio::test]
async fn short_outage_does_not_break_a_transfer() {
    let (proxy, src_conn, dst_conn, _endpoints) = connected_pair().await;
    let (src, dst) = tokio::join!(
        src_conn.open_migration(MigrationId(1), 1),
        dst_conn.accept_migration()
    );
    let (mut src, mut dst) = (src.unwrap(), dst.unwrap());
    let chunks = 40; // 2.5 MiB over ~1.2 s
    let sender = tokio::spawn(send_paced(
        src.bulk.pop().unwrap(),
        chunks,
        Duration::from_millis(30),
    ));
    let receiver = tokio::spawn(receive_all(dst.bulk.pop().unwrap(), chunks));

    tokio::time::sleep(Duration::from_millis(300)).await;
    // Well inside the 800 ms window, leaving room for retransmission backoff.
    proxy.set_blackhole(true);
    tokio::time::sleep(KEEPALIVE.interval).await;
    proxy.set_blackhole(false);

    sender.await.unwrap().expect("sender survives the outage");
    receiver.await.unwrap().expect("receiver gets every byte");
    assert_eq!(src.id, dst.id);
}

#[tokio::test]
async fn long_outage_is_peer_lost_on_every_stream() {
    let (proxy, src_conn, dst_conn, _endpoints) = connected_pair().await;
    let (src, dst) = tokio::join!(
        src_conn.open_migration(MigrationId(2), 2),
        dst_conn.accept_migration()
    );
    let (mut src, mut dst) = (src.unwrap(), dst.unwrap());
    let sender = tokio::spawn(send_paced(
        src.bulk.pop().unwrap(),
        10_000,
        Duration::from_millis(5),
    ));
    let receiver = tokio::spawn(receive_all(dst.bulk.pop().unwrap(), 10_000));
    // An idle stream of the same migration must fail the same way.
    let mut idle_control = dst.control_rx;
    let idle = tokio::spawn(async move {
        let mut b = [0u8; 1];
        idle_control
            .read_exact(&mut b)
            .await
            .map_err(TransportError::from)
    });

    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.set_blackhole(true);
    let cut = Instant::now();

    let window = KEEPALIVE.window();
    let sent = sender.await.unwrap();
    let source_gave_up = cut.elapsed();
    assert!(matches!(sent, Err(TransportError::PeerLost)), "{sent:?}");
    assert!(matches!(
        receiver.await.unwrap(),
        Err(TransportError::PeerLost)
    ));
    assert!(matches!(idle.await.unwrap(), Err(TransportError::PeerLost)));
    let dest_gave_up = cut.elapsed();
    assert!(matches!(src_conn.closed().await, TransportError::PeerLost));
    assert!(matches!(dst_conn.closed().await, TransportError::PeerLost));

    // Packets were flowing until `cut`, so the idle timer started at most a
    // few milliseconds before it.
    let lower = window - Duration::from_millis(50);
    for gave_up in [source_gave_up, dest_gave_up] {
        assert!(
            gave_up >= lower,
            "declared lost after {gave_up:?}, window {window:?}"
        );
        assert!(
            gave_up <= window + UPPER_SLACK,
            "declared lost after {gave_up:?}, window {window:?}"
        );
    }
}

#[tokio::test]
async fn idle_connection_survives_many_windows() {
    // Keepalives alone keep a connection with no traffic alive.
    let (_proxy, src_conn, dst_conn, _endpoints) = connected_pair().await;
    tokio::time::sleep(KEEPALIVE.window() * 3).await;
    let (src, dst) = tokio::join!(
        src_conn.open_migration(MigrationId(3), 1),
        dst_conn.accept_migration()
    );
    assert_eq!(src.unwrap().id, dst.unwrap().id);
}

#[tokio::test]
async fn driver_reports_peer_lost_mid_pass() {
    use transport::driver::{DestinationDriver, SourceDriver};
    use transport::layout::{MemoryLayout, PageRange};
    use transport::limiter::{BytesPerSecond, RateLimiter};
    use transport::session::{DestOptions, DestinationSession, SourceOptions, SourceSession};
    use transport::testing::MemPages;

    let (proxy, src_conn, dst_conn, _endpoints) = connected_pair().await;
    let (src, dst) = tokio::join!(
        src_conn.open_migration(MigrationId(4), 2),
        dst_conn.accept_migration()
    );
    const PAGES: u64 = 4096; // 16 MiB at 4 MiB/s: still running when cut
    let destination = tokio::spawn(async move {
        let mut sink = MemPages::zeroed(PAGES);
        let mut session = DestinationSession::new(DestOptions {
            auto_accept: true,
            ..DestOptions::default()
        });
        let mut driver = DestinationDriver::new(dst.unwrap());
        loop {
            if let Err(e) = driver.next_event(&mut session, &mut sink).await {
                return e;
            }
        }
    });
    let mem = MemPages::random(PAGES, 7);
    let layout = MemoryLayout::x86(PAGES * transport::layout::PAGE_SIZE as u64).unwrap();
    let mut session = SourceSession::new(
        layout,
        SourceOptions {
            compress: false,
            ..SourceOptions::default()
        },
    )
    .unwrap();
    let limiter = RateLimiter::new(BytesPerSecond::mib(4));
    let mut driver = SourceDriver::new(src.unwrap(), limiter);
    driver.handshake(&mut session, &mem).await.unwrap();
    let cut = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        proxy.set_blackhole(true);
        Instant::now()
    };
    let all = [PageRange::new(0, PAGES)];
    let (sent, cut_at) = tokio::join!(driver.send_pass(&mut session, &mem, &all, &[]), cut);
    let err = sent.expect_err("pass cannot finish through a blackhole");
    assert!(err.is_peer_lost(), "{err:?}");
    assert!(cut_at.elapsed() <= KEEPALIVE.window() + UPPER_SLACK);
    let dest_err = destination.await.unwrap();
    assert!(dest_err.is_peer_lost(), "{dest_err:?}");
}
