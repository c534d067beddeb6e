//! Post-copy over real quinn on 127.0.0.1: concurrent faults from several
//! "vCPU" tasks while the source pushes the rest, push order, recovery after
//! a blackholed connection, and the sessions' handling of the post-copy
//! frames in memory.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::{layout, Pair, Recording};
use tokio::sync::{mpsc, oneshot, watch};
use transport::codec::{decode, Capabilities, Frame, FrameType, PageSet, MAX_MISSING_RANGES};
use transport::driver::{DestEvent, DestinationDriver, DriverError, SourceDriver};
use transport::endpoint::{Keepalive, MigrationId};
use transport::layout::{PageIndex, PageRange, PAGE_SIZE};
use transport::limiter::{BytesPerSecond, RateLimiter};
use transport::session::{
    DestAction, DestError, DestOptions, DestState, DestinationSession, SourceError, SourceEvent,
    SourceOptions, SourceSession, SourceState,
};
use transport::testing::{MemPages, Rng};

/// A fault from a vCPU task: the page, and where to say it is present.
type Fault = (u64, oneshot::Sender<()>);

/// What the destination daemon keeps across reconnects while faulting.
#[derive(Default)]
struct Faults {
    waiting: HashMap<u64, Vec<oneshot::Sender<()>>>,
    in_flight: HashSet<u64>,
}

/// The destination daemon's post-copy loop: faults become requests
/// (deduplicated per page), replies and pushed pages wake the waiters.
/// Returns on `PostcopyComplete` or the first driver error.
async fn fault_loop(
    driver: &mut DestinationDriver,
    session: &mut DestinationSession,
    sink: &mut Recording,
    faults: &mut mpsc::Receiver<Fault>,
    state: &mut Faults,
) -> Result<(), DriverError> {
    loop {
        tokio::select! {
            Some((page, tx)) = faults.recv() => {
                if !session.is_missing(PageIndex(page)) {
                    let _ = tx.send(());
                    continue;
                }
                state.waiting.entry(page).or_default().push(tx);
                if state.in_flight.insert(page) {
                    driver.send_page_request(session, PageIndex(page), 1).await?;
                }
            }
            event = driver.next_event(session, sink) => {
                match event? {
                    DestEvent::PageReply { index, count, .. } => {
                        for p in index.0..index.0 + u64::from(count) {
                            state.in_flight.remove(&p);
                        }
                    }
                    DestEvent::PostcopyComplete => {
                        assert_eq!(session.missing_count(), 0);
                        assert!(sink.writes.iter().all(|&w| w == 1), "a page is not in exactly once at Done");
                        for (_, txs) in state.waiting.drain() {
                            txs.into_iter().for_each(|tx| { let _ = tx.send(()); });
                        }
                        return Ok(());
                    }
                    other => panic!("unexpected {other:?}"),
                }
                state.waiting.retain(|&page, txs| {
                    let present = !session.is_missing(PageIndex(page));
                    if present {
                        txs.drain(..).for_each(|tx| { let _ = tx.send(()); });
                    }
                    !present
                });
            }
        }
    }
}

/// A vCPU touching `faults` pages in `first..end`, `pace` apart, once
/// `start` turns true (the guest resumed); returns how long each fault
/// waited.
fn vcpu(
    mut start: watch::Receiver<bool>,
    seed: u64,
    first: u64,
    end: u64,
    faults: usize,
    pace: Duration,
    tx: mpsc::Sender<Fault>,
) -> tokio::task::JoinHandle<Vec<Duration>> {
    tokio::spawn(async move {
        start.wait_for(|&go| go).await.unwrap();
        let mut rng = Rng(seed | 1);
        let mut waits = Vec::new();
        for _ in 0..faults {
            let page = first + rng.below(end - first);
            let (done, present) = oneshot::channel();
            let start = Instant::now();
            tx.send((page, done)).await.unwrap();
            present.await.unwrap();
            waits.push(start.elapsed());
            tokio::time::sleep(pace).await;
        }
        waits
    })
}

fn source_session(pages: u64) -> SourceSession {
    SourceSession::new(
        layout(pages),
        SourceOptions {
            migration_id: "m-pc".into(),
            compress: false,
            batch_pages: 32,
            max_streams: 2,
            postcopy: true,
            ..SourceOptions::default()
        },
    )
    .unwrap()
}

fn dest_session() -> DestinationSession {
    DestinationSession::new(DestOptions {
        auto_accept: true,
        ..DestOptions::default()
    })
}

/// Runs the destination up to the post-copy switchover and resumes.
async fn dest_until_resumed(
    driver: &mut DestinationDriver,
    session: &mut DestinationSession,
    sink: &mut Recording,
    vcpus_go: &watch::Sender<bool>,
) -> Vec<PageRange> {
    loop {
        match driver.next_event(session, sink).await.unwrap() {
            DestEvent::PassComplete(_) | DestEvent::State(_) => {}
            DestEvent::SwitchedOver { postcopy } => {
                assert!(postcopy);
                let missing = session.missing_ranges();
                driver.resumed(session).await.unwrap();
                vcpus_go.send(true).unwrap();
                return missing;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_served_ahead_of_the_push() {
    const PAGES: u64 = 4096; // 16 MiB
    const PRECOPY: u64 = 512;
    const RATE: u64 = 16 << 20; // the push alone takes ~0.9 s
    let pair = Pair::new(None, false).await;
    let (src_conn, dst_conn) = pair.connect().await;
    let (src_streams, dst_streams) = tokio::join!(
        src_conn.open_migration(MigrationId(1), 2),
        dst_conn.accept_migration()
    );
    let mem = MemPages::random(PAGES, 7);
    // Stale contents where pages are missing: they must all be replaced.
    let mut sink = Recording::new(MemPages::random(PAGES, 99));

    let (fault_tx, mut fault_rx) = mpsc::channel(16);
    let (go, go_rx) = watch::channel(false);
    let vcpus: Vec<_> = (0..4)
        .map(|v| {
            vcpu(
                go_rx.clone(),
                v + 1,
                PRECOPY,
                PAGES,
                25,
                Duration::from_millis(5),
                fault_tx.clone(),
            )
        })
        .collect();
    drop(fault_tx);

    let destination = tokio::spawn(async move {
        let mut session = dest_session();
        let mut driver = DestinationDriver::new(dst_streams.unwrap());
        let missing = dest_until_resumed(&mut driver, &mut session, &mut sink, &go).await;
        assert_eq!(missing, [PageRange::new(PRECOPY, PAGES - PRECOPY)]);
        let resumed = Instant::now();
        let mut state = Faults::default();
        fault_loop(
            &mut driver,
            &mut session,
            &mut sink,
            &mut fault_rx,
            &mut state,
        )
        .await
        .unwrap();
        (
            sink,
            session.postcopy_stats(),
            driver.request_latency(),
            resumed.elapsed(),
        )
    });

    let mut session = source_session(PAGES);
    let mut driver =
        SourceDriver::new(src_streams.unwrap(), RateLimiter::new(BytesPerSecond(RATE)));
    driver.handshake(&mut session, &mem).await.unwrap();
    driver
        .send_pass(&mut session, &mem, &[PageRange::new(0, PRECOPY)], &[])
        .await
        .unwrap();
    let paused = Instant::now();
    driver
        .switchover_postcopy(
            &mut session,
            &mem,
            b"state",
            &[PageRange::new(PRECOPY, PAGES - PRECOPY)],
        )
        .await
        .unwrap();
    let served = driver.serve_until_done(&mut session, &mem).await.unwrap();
    let downtime = driver.resumed_at().expect("Resumed arrived") - paused;
    let (sink, dest_stats, latency, push_time) = destination.await.unwrap();
    let mut waits: Vec<Duration> = Vec::new();
    for v in vcpus {
        waits.extend(v.await.unwrap());
    }

    assert!(sink.mem.0 == mem.0, "destination memory differs");
    assert!(
        sink.writes.iter().all(|&w| w == 1),
        "every page exactly once"
    );
    assert_eq!(session.pages_to_push(), 0);
    let stats = session.postcopy_stats();
    assert_eq!(served, dest_stats.requests);
    assert_eq!(stats.requests_served, dest_stats.requests);
    assert!(dest_stats.requests > 0, "no fault needed a request");
    assert_eq!(latency.samples, dest_stats.requests);
    assert_eq!(
        dest_stats.pages_from_push + dest_stats.pages_from_replies,
        PAGES - PRECOPY
    );
    // Whole push under the limit vs a request's round trip: a request that
    // queued behind the push would wait a good part of the push.
    let p99 = latency.p99.unwrap();
    let worst_wait = waits.iter().max().copied().unwrap();
    eprintln!(
        "post-copy: {} requests, rtt p50 {:?} p99 {:?} max {:?}, worst vCPU wait {worst_wait:?}, \
         push {push_time:?}, downtime {downtime:?}, pushed {} served {}",
        dest_stats.requests,
        latency.p50.unwrap(),
        p99,
        latency.max.unwrap(),
        stats.pages_pushed,
        stats.pages_served,
    );
    assert!(
        push_time >= Duration::from_millis(500),
        "push too fast to tell: {push_time:?}"
    );
    assert!(p99 * 5 < push_time, "p99 {p99:?} vs push {push_time:?}");
    assert!(
        worst_wait * 3 < push_time,
        "worst {worst_wait:?} vs push {push_time:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovers_after_the_connection_breaks_mid_push() {
    const PAGES: u64 = 2048; // 8 MiB at 4 MiB/s: still pushing when cut
    const KEEPALIVE: Keepalive = Keepalive {
        interval: Duration::from_millis(200),
        count: 3,
    };
    let pair = Pair::new(Some(KEEPALIVE), true).await;
    let proxy = pair.proxy.as_ref().unwrap();
    let (src_conn, dst_conn) = pair.connect().await;
    let id = MigrationId(77);
    let (src_streams, dst_streams) =
        tokio::join!(src_conn.open_migration(id, 2), dst_conn.accept_migration());
    let mem = MemPages::random(PAGES, 5);
    let mut sink = Recording::new(MemPages::random(PAGES, 55));
    let (fault_tx, mut fault_rx) = mpsc::channel(16);
    let (go, go_rx) = watch::channel(false);
    // Faults keep coming through the outage; they wait and are answered
    // after the resume.
    let vcpus: Vec<_> = (0..2)
        .map(|v| {
            vcpu(
                go_rx.clone(),
                v + 10,
                0,
                PAGES,
                40,
                Duration::from_millis(25),
                fault_tx.clone(),
            )
        })
        .collect();
    drop(fault_tx);
    let (reconnected_tx, reconnected_rx) =
        oneshot::channel::<transport::endpoint::PeerConnection>();
    let (dest_lost_tx, dest_lost_rx) = oneshot::channel::<()>();

    let destination = tokio::spawn(async move {
        let mut session = dest_session();
        let mut driver = DestinationDriver::new(dst_streams.unwrap());
        dest_until_resumed(&mut driver, &mut session, &mut sink, &go).await;
        let mut state = Faults::default();
        let err = fault_loop(
            &mut driver,
            &mut session,
            &mut sink,
            &mut fault_rx,
            &mut state,
        )
        .await
        .expect_err("the blackhole must break the first connection");
        assert!(
            matches!(err, DriverError::Transport { .. }),
            "destination: {err:?}"
        );
        let lost_peer = err.is_peer_lost();
        drop(driver);
        dest_lost_tx.send(()).unwrap();
        let missing_before = session.missing_count();
        session.prepare_resume().unwrap();
        assert_eq!(session.state(), DestState::AwaitResume);
        let conn = reconnected_rx.await.unwrap();
        let mut driver = DestinationDriver::new(conn.accept_migration().await.unwrap());
        let missing = driver.resume(&mut session, &mut sink).await.unwrap();
        assert_eq!(missing, missing_before);
        fault_loop(
            &mut driver,
            &mut session,
            &mut sink,
            &mut fault_rx,
            &mut state,
        )
        .await
        .unwrap();
        (sink, session.postcopy_stats(), lost_peer, conn)
    });

    let mut session = source_session(PAGES);
    let limiter = RateLimiter::new(BytesPerSecond::mib(4));
    let mut driver = SourceDriver::new(src_streams.unwrap(), limiter.clone());
    driver.handshake(&mut session, &mem).await.unwrap();
    driver
        .switchover_postcopy(&mut session, &mem, b"state", &[PageRange::new(0, PAGES)])
        .await
        .unwrap();
    let cut = async {
        tokio::time::sleep(Duration::from_millis(400)).await;
        proxy.set_blackhole(true);
        Instant::now()
    };
    let (served, cut_at) = tokio::join!(driver.serve_until_done(&mut session, &mem), cut);
    let err = served.expect_err("cannot finish through a blackhole");
    assert!(err.is_peer_lost(), "source: {err:?}");
    assert!(cut_at.elapsed() <= KEEPALIVE.window() + Duration::from_millis(1500));
    assert!(session.pages_to_push() > 0 || session.postcopy_stats().pages_pushed < PAGES);
    drop(driver);

    // Lifted only once both sides gave up: otherwise the old connection's
    // packets could reach the source's endpoint, which answers them with a
    // stateless reset instead of letting the destination time out.
    dest_lost_rx.await.unwrap();
    proxy.set_blackhole(false);
    let (src_conn2, dst_conn2) = pair.connect().await;
    reconnected_tx.send(dst_conn2).ok().unwrap();
    let streams = src_conn2.open_migration(id, 2).await.unwrap();
    let mut driver = SourceDriver::new(streams, limiter);
    let missing = driver.resume(&mut session, &mem).await.unwrap();
    assert!(
        missing > 0 && missing < PAGES,
        "missing after resume: {missing}"
    );
    driver.serve_until_done(&mut session, &mem).await.unwrap();

    let (sink, dest_stats, dest_lost_peer, _conn) = destination.await.unwrap();
    for v in vcpus {
        v.await.unwrap();
    }
    assert!(dest_lost_peer, "destination did not see PeerLost");
    assert!(sink.mem.0 == mem.0, "destination memory differs");
    assert!(
        sink.writes.iter().all(|&w| w == 1),
        "every page exactly once"
    );
    assert_eq!(dest_stats.resumes, 1);
    assert_eq!(session.postcopy_stats().resumes, 1);
    assert_eq!(session.state(), SourceState::Done);
}

// ---- in memory ----------------------------------------------------------

/// Frames in `bytes`, in order.
fn frames(mut bytes: &[u8]) -> Vec<Frame> {
    let mut out = Vec::new();
    while let Some((f, n)) = decode(bytes).unwrap() {
        out.push(f);
        bytes = &bytes[n..];
    }
    assert!(bytes.is_empty());
    out
}

/// A source and destination connected in memory, switched over in
/// post-copy with `missing` pages; the destination resumed.
struct InMemory {
    src: SourceSession,
    dst: DestinationSession,
    mem: MemPages,
    sink: Recording,
}

impl InMemory {
    fn new(pages: u64, missing: &[PageRange]) -> Self {
        let mem = MemPages::random(pages, 3);
        let mut sink = Recording::new(MemPages::new(mem.0.clone()));
        let mut src = SourceSession::new(
            layout(pages),
            SourceOptions {
                migration_id: "m".into(),
                compress: false,
                batch_pages: 4,
                postcopy: true,
                ..SourceOptions::default()
            },
        )
        .unwrap();
        let mut dst = dest_session();
        let mut out = Vec::new();
        src.hello(&mut out).unwrap();
        let acts = dst.feed(&out, &mut sink).unwrap();
        let DestAction::Send(ack) = &acts[0] else {
            panic!("{acts:?}")
        };
        src.handle(ack.clone(), &mem, &mut Vec::new()).unwrap();
        out.clear();
        src.send_state_postcopy(b"s", missing, &mut out).unwrap();
        let acts = dst.feed(&out, &mut sink).unwrap();
        assert!(acts.contains(&DestAction::SwitchedOver { postcopy: true }));
        assert_eq!(dst.missing_ranges(), missing);
        assert_eq!(dst.resumed().unwrap(), Frame::Resumed);
        Self {
            src,
            dst,
            mem,
            sink,
        }
    }

    /// A fault on `count` pages from `index`: the request goes to the
    /// source, its reply back; what the destination did with it.
    fn fault(&mut self, index: u64, count: u32) -> Vec<DestAction> {
        let req = self.dst.request_pages(PageIndex(index), count).unwrap();
        let mut reply = Vec::new();
        self.src.handle(req, &self.mem, &mut reply).unwrap();
        self.dst.feed(&reply, &mut self.sink).unwrap()
    }

    /// The next push frame, decoded.
    fn push(&mut self) -> Option<Frame> {
        let mut out = Vec::new();
        self.src.next_push_frame(&self.mem, &mut out).unwrap()?;
        Some(frames(&out).remove(0))
    }
}

fn first_page(f: &Frame) -> u64 {
    match f {
        Frame::PageBatch(b) => b.set.first().0,
        other => panic!("{other:?}"),
    }
}

#[test]
fn push_continues_after_the_latest_request_and_wraps() {
    let mut m = InMemory::new(64, &[PageRange::new(0, 64)]);
    assert_eq!(first_page(&m.push().unwrap()), 0);
    // A fault at 40..42: served, and the push jumps right behind it.
    let mut reply = Vec::new();
    let ev = m
        .src
        .handle(
            Frame::PageRequest {
                id: 0,
                index: PageIndex(40),
                count: 2,
            },
            &m.mem,
            &mut reply,
        )
        .unwrap();
    assert!(matches!(ev, Some(SourceEvent::PageServed { .. })));
    let mut order = Vec::new();
    while let Some(f) = m.push() {
        if let Frame::PageBatch(b) = &f {
            order.extend(b.set.iter().map(|p| p.0));
        }
    }
    // 42.. to the end, then the pages before the cursor; never 0..4 or
    // 40..42 again.
    let expected: Vec<u64> = (42..64).chain(4..40).collect();
    assert_eq!(order, expected);
    assert_eq!(m.src.pages_to_push(), 0);
    let s = m.src.postcopy_stats();
    assert_eq!(
        (s.requests_served, s.pages_served, s.pages_pushed),
        (1, 2, 62)
    );
}

#[test]
fn installed_pages_are_never_overwritten_and_done_follows_the_last() {
    let mut m = InMemory::new(16, &[PageRange::new(4, 8)]);
    // The guest faults on page 5 and writes to it once installed.
    let acts = m.fault(5, 1);
    assert!(matches!(
        acts[..],
        [DestAction::PageReplyReceived { id: 0, .. }]
    ));
    m.sink.mem.page_mut(5).fill(0xEE);
    assert!(!m.dst.is_missing(PageIndex(5)));
    // A push batch covering 4..8 was built before the request was seen.
    let data: Vec<u8> = (4..8).flat_map(|p| m.mem.page(p).to_vec()).collect();
    let stale = Frame::PageBatch(transport::codec::PageBatch {
        pass: 0,
        set: PageSet::Run {
            first: PageIndex(4),
            count: 4,
        },
        data: data.into(),
    });
    let acts = m.dst.feed(&stale.to_bytes().unwrap(), &mut m.sink).unwrap();
    assert!(acts.is_empty(), "{acts:?}");
    assert!(
        m.sink.mem.page(5).iter().all(|&b| b == 0xEE),
        "installed page overwritten"
    );
    assert_eq!(m.dst.missing_count(), 4);
    let mut done_seen = 0;
    while let Some(f) = m.push() {
        let before = m.dst.missing_count();
        let acts = m.dst.feed(&f.to_bytes().unwrap(), &mut m.sink).unwrap();
        if acts.contains(&DestAction::Send(Frame::Done)) {
            done_seen += 1;
            assert!(before > 0 && m.dst.missing_count() == 0);
            assert_eq!(
                acts,
                [DestAction::Send(Frame::Done), DestAction::PostcopyComplete]
            );
        } else {
            // Pushes that were on the wire when the last page came are
            // dropped quietly.
            assert!(acts.is_empty(), "{acts:?}");
        }
    }
    assert_eq!(done_seen, 1);
    assert_eq!(m.dst.state(), DestState::Done);
    assert_eq!(
        m.sink.writes.iter().sum::<u32>(),
        8,
        "each missing page written once"
    );
    let s = m.dst.postcopy_stats();
    assert_eq!(
        (s.pages_from_replies, s.pages_from_push, s.duplicate_pages),
        (1, 7, 3 + 1)
    );
    // The source takes Resumed, then Done.
    let mut sink = Vec::new();
    assert_eq!(
        m.src.handle(Frame::Resumed, &m.mem, &mut sink).unwrap(),
        Some(SourceEvent::Resumed)
    );
    assert_eq!(
        m.src.handle(Frame::Done, &m.mem, &mut sink).unwrap(),
        Some(SourceEvent::Done)
    );
}

/// A pushed batch arrives in stream chunks (kept as views of them); the
/// sink still gets one call per run of missing pages, which after a
/// switchover is one UFFDIO_COPY each.
#[test]
fn a_pushed_batch_in_pieces_is_installed_in_one_call_per_missing_run() {
    let mut m = InMemory::new(16, &[PageRange::new(0, 16)]);
    m.fault(2, 2);
    m.sink.calls.clear();
    let data: Vec<u8> = (0..8).flat_map(|p| m.mem.page(p).to_vec()).collect();
    let pieces = data
        .chunks(5952)
        .map(bytes::Bytes::copy_from_slice)
        .collect();
    let batch = Frame::PageBatch(transport::codec::PageBatch {
        pass: 0,
        set: PageSet::Run {
            first: PageIndex(0),
            count: 8,
        },
        data: transport::codec::PageData::from_pieces(pieces),
    });
    m.dst.handle(batch, &mut m.sink).unwrap();
    assert_eq!(m.sink.calls, [(0, 2), (4, 4)]);
    for p in 0..8 {
        assert!(m.sink.mem.page(p) == m.mem.page(p), "page {p}");
    }
    assert_eq!(m.dst.missing_count(), 8);
}

#[test]
fn resume_exchanges_the_missing_set_and_resends_requests() {
    let mut m = InMemory::new(32, &[PageRange::new(0, 32)]);
    // Half pushed before the break, one request unanswered.
    for _ in 0..4 {
        let f = m.push().unwrap();
        m.dst.feed(&f.to_bytes().unwrap(), &mut m.sink).unwrap();
    }
    let lost = m.push().unwrap(); // sent, never arrived
    drop(lost);
    let req = m.dst.request_pages(PageIndex(30), 2).unwrap();
    assert_eq!(m.dst.missing_count(), 16);

    // Resume hello that is not a resume: refused, still waiting.
    m.dst.prepare_resume().unwrap();
    let mut fresh = SourceSession::new(
        layout(32),
        SourceOptions {
            migration_id: "m".into(),
            postcopy: true,
            ..SourceOptions::default()
        },
    )
    .unwrap();
    let mut out = Vec::new();
    fresh.hello(&mut out).unwrap();
    let acts = m.dst.feed(&out, &mut m.sink).unwrap();
    assert!(
        matches!(&acts[..], [DestAction::Send(Frame::Refuse { .. })]),
        "{acts:?}"
    );
    assert_eq!(m.dst.state(), DestState::AwaitResume);
    // Another migration's resume: refused too.
    let mut other = SourceSession::new(
        layout(32),
        SourceOptions {
            migration_id: "other".into(),
            postcopy: true,
            ..SourceOptions::default()
        },
    )
    .unwrap();
    other.hello(&mut Vec::new()).unwrap();
    let mut out = Vec::new();
    // (A session that never switched over cannot resume.)
    assert!(matches!(
        other.resume(&mut out),
        Err(SourceError::WrongState { .. })
    ));

    // The real resume.
    let mut out = Vec::new();
    m.src.resume(&mut out).unwrap();
    let acts = m.dst.feed(&out, &mut m.sink).unwrap();
    let mut to_source = Vec::new();
    for a in &acts {
        match a {
            DestAction::Send(f) => f.encode(&mut to_source).unwrap(),
            DestAction::ResumeAccepted { missing } => assert_eq!(*missing, 16),
            other => panic!("{other:?}"),
        }
    }
    let mut event = None;
    for f in frames(&to_source) {
        if let Frame::HelloAck(ack) = &f {
            assert!(ack.capabilities.contains(Capabilities::RESUME));
        }
        event = m.src.handle(f, &m.mem, &mut Vec::new()).unwrap().or(event);
    }
    assert_eq!(event, Some(SourceEvent::ResumeAccepted { missing: 16 }));
    assert_eq!(m.src.pages_to_push(), 16);
    // The unanswered request goes again with its id.
    assert_eq!(m.dst.outstanding_requests(), std::slice::from_ref(&req));
    let mut reply = Vec::new();
    m.src.handle(req, &m.mem, &mut reply).unwrap();
    m.dst.feed(&reply, &mut m.sink).unwrap();
    while let Some(f) = m.push() {
        m.dst.feed(&f.to_bytes().unwrap(), &mut m.sink).unwrap();
    }
    assert_eq!(m.dst.state(), DestState::Done);
    assert!(m.sink.mem.0 == m.mem.0);
    assert!(
        m.sink.writes.iter().all(|&w| w == 1),
        "every page installed once"
    );
}

#[test]
fn post_copy_frames_in_the_wrong_state_are_rejected() {
    let pages = 16;
    // Destination: missing pages before any hello.
    let missing = Frame::MissingPages {
        last: true,
        ranges: vec![PageRange::new(0, 1)],
    };
    let mut sink = Recording::new(MemPages::new(vec![0; pages as usize * PAGE_SIZE]));
    let mut dst = dest_session();
    let err = dst.handle(missing.clone(), &mut sink).unwrap_err();
    assert!(
        matches!(
            err,
            DestError::Unexpected {
                frame: FrameType::MissingPages,
                ..
            }
        ),
        "{err:?}"
    );

    // Destination: a second set after the last chunk, a pre-copy
    // switchover after a set, ranges outside the layout, `Resumed`.
    let setup = |dst: &mut DestinationSession, sink: &mut Recording| {
        let mut src = source_session(pages);
        let mut out = Vec::new();
        src.hello(&mut out).unwrap();
        dst.feed(&out, sink).unwrap();
        dst.handle(Frame::State { blob: vec![] }, sink).unwrap();
    };
    let cases: Vec<(Vec<Frame>, ErrorCheck)> = vec![
        (vec![missing.clone(), missing.clone()], |e| {
            matches!(e, DestError::Unexpected { .. })
        }),
        (
            vec![missing.clone(), Frame::Switchover { postcopy: false }],
            |e| matches!(e, DestError::Unexpected { .. }),
        ),
        (
            vec![
                Frame::MissingPages {
                    last: false,
                    ranges: vec![],
                },
                Frame::Switchover { postcopy: true },
            ],
            |e| matches!(e, DestError::Unexpected { .. }),
        ),
        (
            vec![Frame::MissingPages {
                last: true,
                ranges: vec![PageRange::new(10, 7)],
            }],
            |e| matches!(e, DestError::OutOfRange(_)),
        ),
        (vec![Frame::Resumed], |e| {
            matches!(e, DestError::Unexpected { .. })
        }),
    ];
    for (i, (seq, check)) in cases.into_iter().enumerate() {
        let mut dst = dest_session();
        setup(&mut dst, &mut sink);
        let (last, first) = seq.split_last().unwrap();
        for f in first {
            dst.handle(f.clone(), &mut sink).unwrap();
        }
        let err = dst.handle(last.clone(), &mut sink).unwrap_err();
        assert!(check(&err), "case {i}: {err:?}");
        assert_eq!(dst.state(), DestState::Failed);
        assert!(err.abort_frame().is_some());
    }
    // A session that never switched over in post-copy cannot resume.
    let mut dst = dest_session();
    setup(&mut dst, &mut sink);
    assert!(matches!(
        dst.prepare_resume(),
        Err(DestError::WrongState { .. })
    ));

    // Source: `Resumed` before the switchover, a missing set outside a
    // resume, a resume ack without RESUME.
    let mem = MemPages::random(pages, 1);
    let mut m = InMemory::new(pages, &[PageRange::new(0, 4)]);
    let err = m
        .src
        .handle(missing.clone(), &mem, &mut Vec::new())
        .unwrap_err();
    assert!(
        matches!(
            err,
            SourceError::Unexpected {
                frame: FrameType::MissingPages,
                ..
            }
        ),
        "{err:?}"
    );
    let mut src = source_session(pages);
    src.hello(&mut Vec::new()).unwrap();
    let err = src
        .handle(Frame::Resumed, &mem, &mut Vec::new())
        .unwrap_err();
    assert!(
        matches!(
            err,
            SourceError::Unexpected {
                frame: FrameType::Resumed,
                ..
            }
        ),
        "{err:?}"
    );
    let mut m = InMemory::new(pages, &[PageRange::new(0, 4)]);
    m.src.resume(&mut Vec::new()).unwrap();
    let plain_ack = Frame::HelloAck(transport::codec::HelloAck {
        version: transport::codec::PROTOCOL_VERSION,
        capabilities: Capabilities::POSTCOPY,
        max_streams: 1,
    });
    assert!(m.src.handle(plain_ack, &mem, &mut Vec::new()).is_err());
    // Unsorted missing ranges are refused before anything is sent.
    let mut m2 = source_session(pages);
    let mut out = Vec::new();
    m2.hello(&mut out).unwrap();
    let mut d = dest_session();
    let acts = d.feed(&out, &mut sink).unwrap();
    let DestAction::Send(ack) = &acts[0] else {
        panic!()
    };
    m2.handle(ack.clone(), &mem, &mut Vec::new()).unwrap();
    let mut out = Vec::new();
    let err = m2
        .send_state_postcopy(b"", &[PageRange::new(5, 2), PageRange::new(0, 2)], &mut out)
        .unwrap_err();
    assert!(matches!(err, SourceError::UnsortedRanges));
    assert!(out.is_empty());
}

#[test]
fn missing_pages_frames_decode_strictly() {
    let good = Frame::MissingPages {
        last: true,
        ranges: vec![PageRange::new(0, 2), PageRange::new(5, 1)],
    };
    let bytes = good.to_bytes().unwrap();
    assert_eq!(decode(&bytes).unwrap().unwrap().0, good);
    assert_eq!(
        decode(&Frame::Resumed.to_bytes().unwrap())
            .unwrap()
            .unwrap()
            .0,
        Frame::Resumed
    );
    let bad = |ranges: Vec<PageRange>| {
        // Encode by hand: the encoder does not check order.
        let bytes = Frame::MissingPages {
            last: false,
            ranges,
        }
        .to_bytes()
        .unwrap();
        decode(&bytes).is_err()
    };
    assert!(
        bad(vec![PageRange::new(5, 1), PageRange::new(0, 1)]),
        "unsorted"
    );
    assert!(
        bad(vec![PageRange::new(0, 2), PageRange::new(1, 1)]),
        "overlap"
    );
    assert!(bad(vec![PageRange::new(0, 0)]), "empty range");
    assert!(bad(vec![PageRange::new(u64::MAX, 2)]), "overflow");
    let too_many = Frame::MissingPages {
        last: true,
        ranges: (0..MAX_MISSING_RANGES as u64 + 1)
            .map(|i| PageRange::new(i * 2, 1))
            .collect(),
    };
    assert!(too_many.to_bytes().is_err());
    // A count larger than the body, and a bad `last` flag.
    let mut b = bytes.clone();
    b[12 + 1..12 + 5].copy_from_slice(&3u32.to_le_bytes());
    fix_crc(&mut b);
    assert!(decode(&b).is_err());
    let mut b = bytes;
    b[12] = 2;
    fix_crc(&mut b);
    assert!(decode(&b).is_err());
}

/// What a rejected frame's error must look like.
type ErrorCheck = fn(&DestError) -> bool;

fn fix_crc(frame: &mut [u8]) {
    let crc = crc32fast::hash(&frame[12..]);
    frame[8..12].copy_from_slice(&crc.to_le_bytes());
}
