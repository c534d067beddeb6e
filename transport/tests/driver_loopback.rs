//! Whole migrations between a `SourceSession` and a `DestinationSession`
//! driven over real quinn streams on 127.0.0.1.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use transport::codec::ReasonCode;
use transport::driver::{DestEvent, DestinationDriver, DriverError, SourceDriver};
use transport::endpoint::{Endpoint, EndpointConfig, MigrationId, PeerConnection};
use transport::identity::{ClusterCa, HostName, Validity};
use transport::layout::{MemoryLayout, PageIndex, PageRange, PAGE_SIZE};
use transport::limiter::RateLimiter;
use transport::session::{
    DestOptions, DestinationSession, SourceError, SourceOptions, SourceSession,
};
use transport::testing::{MemPages, Rng};

/// `pages` pages: a third random, a third text-like, a third zero.
fn guest(pages: u64, seed: u64) -> MemPages {
    let mut m = MemPages::new(vec![0u8; pages as usize * PAGE_SIZE]);
    let mut rng = Rng(seed | 1);
    for i in 0..pages {
        let kind = i % 3;
        for (j, b) in m.page_mut(i).iter_mut().enumerate() {
            *b = match kind {
                0 => rng.next() as u8,
                1 => b"the quick brown fox "[j % 20].wrapping_add(i as u8),
                _ => 0,
            };
        }
    }
    m
}

async fn connected() -> (PeerConnection, PeerConnection, [Endpoint; 2]) {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
    let ca = ClusterCa::generate("cluster").unwrap();
    let validity = Validity::for_duration(Duration::from_secs(3600));
    let config =
        EndpointConfig::listening_on(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).with_large_mtu();
    let name = |n: &str| HostName::new(n).unwrap();
    let a = Endpoint::bind(&config, &ca.host_identity(&name("src"), validity).unwrap()).unwrap();
    let b = Endpoint::bind(&config, &ca.host_identity(&name("dst"), validity).unwrap()).unwrap();
    let server = b.clone();
    let accepted = tokio::spawn(async move { server.accept().await.unwrap().unwrap() });
    let dialed = a
        .connect(b.local_addr().unwrap(), &name("dst"))
        .await
        .unwrap();
    (dialed, accepted.await.unwrap(), [a, b])
}

fn layout(pages: u64) -> MemoryLayout {
    MemoryLayout::x86(pages * PAGE_SIZE as u64).unwrap()
}

fn source_session(pages: u64, postcopy: bool) -> SourceSession {
    SourceSession::new(
        layout(pages),
        SourceOptions {
            host: "src".into(),
            migration_id: "m-1".into(),
            vm_name: "vm".into(),
            compress: true,
            batch_pages: 128,
            max_streams: 3,
            postcopy,
            ..SourceOptions::default()
        },
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn precopy_moves_memory_and_state() {
    const PAGES: u64 = 2048; // 8 MiB
    let (src_conn, dst_conn, _eps) = connected().await;
    let (src_streams, dst_streams) = tokio::join!(
        src_conn.open_migration(MigrationId(1), 3),
        dst_conn.accept_migration()
    );
    let mut mem = guest(PAGES, 7);
    // The destination starts with garbage so zero runs must really clear.
    let mut dst_mem = guest(PAGES, 99);
    dst_mem.0.iter_mut().for_each(|b| *b = b.wrapping_add(1));

    let destination = tokio::spawn(async move {
        let mut session = DestinationSession::new(DestOptions::default());
        let mut driver = DestinationDriver::new(dst_streams.unwrap());
        let mut passes = Vec::new();
        let mut state = None;
        loop {
            match driver.next_event(&mut session, &mut dst_mem).await.unwrap() {
                DestEvent::Hello(hello) => {
                    assert_eq!(hello.vm_name, "vm");
                    let ack = session.accept().unwrap();
                    driver.send_control(&ack).await.unwrap();
                }
                DestEvent::PassComplete(end) => passes.push(end.pass),
                DestEvent::State(blob) => state = Some(blob),
                DestEvent::SwitchedOver { postcopy } => {
                    assert!(!postcopy);
                    let done = session.resumed().unwrap();
                    driver.send_control(&done).await.unwrap();
                    return (dst_mem, passes, state);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    });

    let mut session = source_session(PAGES, false);
    let mut driver = SourceDriver::new(src_streams.unwrap(), RateLimiter::unlimited());
    let ack = driver.handshake(&mut session, &mem).await.unwrap();
    assert!(ack
        .capabilities
        .contains(transport::codec::Capabilities::ZSTD));
    let all = [PageRange::new(0, PAGES)];
    let pass0 = driver
        .send_pass(&mut session, &mem, &all, &[])
        .await
        .unwrap();
    assert_eq!(pass0.pages + pass0.zero_pages, PAGES);
    // Dirty a few pages (including turning a zero page into data) and send
    // only those.
    for i in [5, 6, 7, 500, 2000] {
        mem.page_mut(i).fill(0xAB);
    }
    let dirty = [
        PageRange::new(5, 3),
        PageRange::new(500, 1),
        PageRange::new(2000, 1),
    ];
    let pass1 = driver
        .send_pass(&mut session, &mem, &dirty, &[])
        .await
        .unwrap();
    assert_eq!(pass1.pages, 5);
    driver
        .switchover(&mut session, &mem, b"vcpu-and-device-state", false)
        .await
        .unwrap();

    let (dst_mem, passes, state) = destination.await.unwrap();
    assert_eq!(passes, [0, 1]);
    assert_eq!(state.as_deref(), Some(&b"vcpu-and-device-state"[..]));
    assert!(dst_mem.0 == mem.0, "destination memory differs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postcopy_fetches_missing_pages_on_request() {
    const PAGES: u64 = 512;
    let (src_conn, dst_conn, _eps) = connected().await;
    let (src_streams, dst_streams) = tokio::join!(
        src_conn.open_migration(MigrationId(2), 1),
        dst_conn.accept_migration()
    );
    let mem = guest(PAGES, 3);
    let dst_mem = MemPages::new(vec![0u8; mem.0.len()]);

    let destination = tokio::spawn(async move {
        let mut dst_mem = dst_mem;
        let mut session = DestinationSession::new(DestOptions {
            auto_accept: true,
            ..DestOptions::default()
        });
        let mut driver = DestinationDriver::new(dst_streams.unwrap());
        loop {
            match driver.next_event(&mut session, &mut dst_mem).await.unwrap() {
                DestEvent::SwitchedOver { postcopy } => {
                    assert!(postcopy);
                    break;
                }
                DestEvent::PassComplete(_) | DestEvent::State(_) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        // The first half came in pre-copy; fault in the rest in pieces of
        // varying size.
        let mut next = PAGES / 2;
        let mut requests = 0;
        while next < PAGES {
            let count = (1 + requests % 7).min((PAGES - next) as u32);
            driver
                .request_pages(&mut session, &mut dst_mem, PageIndex(next), count)
                .await
                .unwrap();
            next += u64::from(count);
            requests += 1;
        }
        let done = session.resumed().unwrap();
        driver.send_control(&done).await.unwrap();
        (dst_mem, requests)
    });

    let mut session = source_session(PAGES, true);
    let mut driver = SourceDriver::new(src_streams.unwrap(), RateLimiter::unlimited());
    driver.handshake(&mut session, &mem).await.unwrap();
    driver
        .send_pass(&mut session, &mem, &[PageRange::new(0, PAGES / 2)], &[])
        .await
        .unwrap();
    driver
        .switchover(&mut session, &mem, b"state", true)
        .await
        .unwrap();
    let served = driver.serve_until_done(&mut session, &mem).await.unwrap();

    let (dst_mem, requests) = destination.await.unwrap();
    assert_eq!(served, u64::from(requests));
    assert!(dst_mem.0 == mem.0, "destination memory differs");
}

#[tokio::test]
async fn refused_hello_reaches_the_source() {
    let (src_conn, dst_conn, _eps) = connected().await;
    let (src_streams, dst_streams) = tokio::join!(
        src_conn.open_migration(MigrationId(3), 1),
        dst_conn.accept_migration()
    );
    let mem = guest(16, 1);
    let destination = tokio::spawn(async move {
        let mut sink = MemPages::new(vec![0u8; 16 * PAGE_SIZE]);
        let mut session = DestinationSession::new(DestOptions::default());
        let mut driver = DestinationDriver::new(dst_streams.unwrap());
        let event = driver.next_event(&mut session, &mut sink).await.unwrap();
        assert!(matches!(event, DestEvent::Hello(_)));
        let refuse = session.refuse(ReasonCode::NotEnoughMemory, "no room");
        driver.send_control(&refuse).await.unwrap();
        // Keep the streams open until the source has read the refusal.
        driver.next_event(&mut session, &mut sink).await.err()
    });
    let mut session = source_session(16, false);
    let mut driver = SourceDriver::new(src_streams.unwrap(), RateLimiter::unlimited());
    let err = driver.handshake(&mut session, &mem).await.unwrap_err();
    assert!(
        matches!(err, DriverError::Source(SourceError::Refused { code: ReasonCode::NotEnoughMemory, ref message }) if message == "no room"),
        "{err:?}"
    );
    drop(driver);
    src_conn.close(0, "done");
    assert!(destination.await.unwrap().is_some());
}

#[tokio::test(start_paused = false)]
async fn rate_limit_paces_a_pass() {
    const PAGES: u64 = 768; // 3 MiB, a third of it zero
    let (src_conn, dst_conn, _eps) = connected().await;
    let (src_streams, dst_streams) = tokio::join!(
        src_conn.open_migration(MigrationId(4), 2),
        dst_conn.accept_migration()
    );
    let mem = guest(PAGES, 11);
    let destination = tokio::spawn(async move {
        let mut sink = MemPages::new(vec![0u8; PAGES as usize * PAGE_SIZE]);
        let mut session = DestinationSession::new(DestOptions {
            auto_accept: true,
            ..DestOptions::default()
        });
        let mut driver = DestinationDriver::new(dst_streams.unwrap());
        loop {
            if let DestEvent::PassComplete(_) =
                driver.next_event(&mut session, &mut sink).await.unwrap()
            {
                return sink;
            }
        }
    });
    let mut session = SourceSession::new(
        layout(PAGES),
        SourceOptions {
            compress: false,
            batch_pages: 32,
            ..SourceOptions::default()
        },
    )
    .unwrap();
    let rate = 4 * 1024 * 1024;
    let mut driver = SourceDriver::new(
        src_streams.unwrap(),
        RateLimiter::new(transport::limiter::BytesPerSecond(rate)),
    );
    driver.handshake(&mut session, &mem).await.unwrap();
    let start = std::time::Instant::now();
    let stats = driver
        .send_pass(&mut session, &mem, &[PageRange::new(0, PAGES)], &[])
        .await
        .unwrap();
    let took = start.elapsed();
    // ~2 MiB of page data at 4 MiB/s, less the initial burst.
    let floor = Duration::from_secs_f64(
        (stats.wire_bytes as f64 - 2.0 * transport::limiter::MIN_BURST as f64) / rate as f64,
    );
    assert!(took >= floor, "pass took {took:?}, floor {floor:?}");
    let sink = destination.await.unwrap();
    assert!(sink.0 == mem.0);
}

#[tokio::test]
async fn malformed_bytes_fail_the_destination_and_tell_the_source() {
    use transport::codec::{Frame, FrameBuffer};
    use transport::driver::StreamRole;

    let (src_conn, dst_conn, _eps) = connected().await;
    let (src, dst) = tokio::join!(
        src_conn.open_migration(MigrationId(5), 1),
        dst_conn.accept_migration()
    );
    let mut src = src.unwrap();
    let destination = tokio::spawn(async move {
        let mut sink = MemPages::new(vec![0u8; 16 * PAGE_SIZE]);
        let mut session = DestinationSession::new(DestOptions::default());
        let mut driver = DestinationDriver::new(dst.unwrap());
        let err = driver
            .next_event(&mut session, &mut sink)
            .await
            .unwrap_err();
        // Keep the streams open until the source has read the answer.
        let _ = driver.next_event(&mut session, &mut sink).await;
        err
    });
    // A frame header with an unknown type, on a bulk stream.
    src.bulk[0].write_all(&[0xEE; 12]).await.unwrap();

    let mut buf = FrameBuffer::new();
    let answer = loop {
        if let Some(frame) = buf.next_frame().unwrap() {
            break frame;
        }
        let chunk = src.control_rx.read_chunk(usize::MAX, true).await.unwrap();
        buf.push(&chunk.expect("control stream open").bytes);
    };
    assert!(
        matches!(
            answer,
            Frame::Refuse {
                code: ReasonCode::BadFrame,
                ..
            }
        ),
        "{answer:?}"
    );
    src_conn.close(0, "done");
    let err = destination.await.unwrap();
    assert!(
        matches!(
            err,
            DriverError::Decode {
                stream: StreamRole::Bulk(0),
                ..
            }
        ),
        "{err:?}"
    );
}
