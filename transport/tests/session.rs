//! Whole migrations between a `SourceSession` and a `DestinationSession`
//! in memory, with page frames spread over several simulated streams, and
//! the destination's reaction to corrupt, out-of-range and misordered
//! frames.

use std::collections::BTreeSet;
use std::io;

use transport::codec::{
    decode, AckWhat, Frame, FrameBuffer, FrameType, PageBatch, PageSet, PassEnd, ReasonCode,
    HEADER_LEN,
};
use transport::layout::{MemoryLayout, PageIndex, PageRange, PAGE_SIZE};
use transport::session::{
    DestAction, DestError, DestOptions, DestState, DestinationSession, PageSink, SourceError,
    SourceEvent, SourceOptions, SourceSession, SourceState,
};
use transport::testing::{page_runs, MemPages, Rng};

/// A sink that only records what was written.
#[derive(Default)]
struct Recorder(Vec<(u64, u64)>);

impl PageSink for Recorder {
    fn write_page(&mut self, index: PageIndex, _: &[u8; PAGE_SIZE]) -> io::Result<()> {
        self.0.push((index.0, 1));
        Ok(())
    }
    fn write_zero(&mut self, start: PageIndex, count: u64) -> io::Result<()> {
        self.0.push((start.0, count));
        Ok(())
    }
}

/// Memory that takes any byte range ([`PageSink::writes_bytes`]) and
/// records every write: `(byte address, length)` for byte writes, and how
/// many page-granular writes came.
struct ByteMem {
    mem: MemPages,
    byte_writes: Vec<(u64, usize)>,
    page_writes: usize,
}

impl ByteMem {
    /// `len` bytes of garbage (0x5A), no writes yet.
    fn new(len: usize) -> Self {
        Self {
            mem: MemPages::new(vec![0x5A; len]).taking_bytes(),
            byte_writes: Vec::new(),
            page_writes: 0,
        }
    }
}

impl PageSink for ByteMem {
    fn write_page(&mut self, index: PageIndex, data: &[u8; PAGE_SIZE]) -> io::Result<()> {
        self.page_writes += 1;
        self.mem.write_page(index, data)
    }
    fn write_zero(&mut self, start: PageIndex, count: u64) -> io::Result<()> {
        self.mem.write_zero(start, count)
    }
    fn write_pages(&mut self, first: PageIndex, data: &[u8]) -> io::Result<()> {
        self.page_writes += 1;
        self.mem.write_pages(first, data)
    }
    fn writes_bytes(&self) -> bool {
        true
    }
    fn write_bytes(&mut self, at: u64, data: &[u8]) -> io::Result<()> {
        self.byte_writes.push((at, data.len()));
        self.mem.write_bytes(at, data)
    }
}

/// Fills a page as one of: zero, random, or compressible text-like bytes.
fn fill_page(page: &mut [u8], kind: u64, rng: &mut Rng) {
    match kind {
        0 => page.fill(0),
        1 => page
            .chunks_exact_mut(8)
            .for_each(|c| c.copy_from_slice(&rng.next().to_le_bytes())),
        _ => {
            let seed = rng.next();
            for (i, b) in page.iter_mut().enumerate() {
                *b = b"migrate "[(i + seed as usize) % 8] ^ (i / 512) as u8;
            }
        }
    }
}

/// Delivers frames to the destination the way a multi-stream driver would.
struct Wire {
    control: FrameBuffer,
    bulk: Vec<FrameBuffer>,
}

impl Wire {
    fn new(streams: usize) -> Self {
        Self {
            control: FrameBuffer::new(),
            bulk: (0..streams).map(|_| FrameBuffer::new()).collect(),
        }
    }
}

fn deliver(
    dest: &mut DestinationSession,
    fb: &mut FrameBuffer,
    bytes: &[u8],
    sink: &mut MemPages,
) -> Vec<DestAction> {
    fb.push(bytes);
    let mut actions = Vec::new();
    while let Some(f) = fb.next_frame().expect("valid frame") {
        actions.extend(dest.handle(f, sink).expect("frame accepted"));
    }
    actions
}

/// Sends the destination's replies back to the source.
fn reply_to_source(
    src: &mut SourceSession,
    mem: &MemPages,
    actions: &[DestAction],
) -> Vec<SourceEvent> {
    let mut out = Vec::new();
    actions
        .iter()
        .filter_map(|a| match a {
            DestAction::Send(f) => src.handle(f.clone(), mem, &mut out).unwrap(),
            _ => None,
        })
        .collect()
}

/// Runs one pass with frames spread over the bulk streams; the `PassEnd`
/// is delivered before the last page frames, as can happen across streams.
fn run_pass(
    src: &mut SourceSession,
    dest: &mut DestinationSession,
    wire: &mut Wire,
    smem: &MemPages,
    dmem: &mut MemPages,
    pages: &[PageRange],
    known_zero: &[PageRange],
) -> PassEnd {
    let mut ctl = Vec::new();
    let pass = src.begin_pass(pages, known_zero, &mut ctl).unwrap();
    let mut frames: Vec<(usize, Vec<u8>)> = Vec::new();
    let mut i = 0;
    loop {
        let mut f = Vec::new();
        if src.next_frame(smem, &mut f).unwrap().is_none() {
            break;
        }
        frames.push((i % wire.bulk.len(), f));
        i += 1;
    }
    src.end_pass(&mut ctl).unwrap();
    let (begin, end) = ctl.split_at(HEADER_LEN + 4);
    assert!(deliver(dest, &mut wire.control, begin, dmem).is_empty());
    let held = frames.len().min(3);
    let late = frames.split_off(frames.len() - held);
    for (s, f) in frames {
        let a = deliver(dest, &mut wire.bulk[s], &f, dmem);
        assert!(a.is_empty(), "no reply before the pass ends");
    }
    let mut actions = deliver(dest, &mut wire.control, end, dmem);
    for (s, f) in late {
        assert!(actions.is_empty(), "ack only once every frame arrived");
        // Split each frame in two reads to exercise reassembly.
        let (a, b) = f.split_at(f.len() / 2);
        actions.extend(deliver(dest, &mut wire.bulk[s], a, dmem));
        actions.extend(deliver(dest, &mut wire.bulk[s], b, dmem));
    }
    let done = actions.iter().find_map(|a| match a {
        DestAction::PassComplete(e) => Some(*e),
        _ => None,
    });
    let end = done.expect("pass complete");
    assert_eq!(end.pass, pass);
    assert_eq!(
        reply_to_source(src, smem, &actions),
        [SourceEvent::PassAcked(pass)]
    );
    end
}

fn migrate(total_mib: u64, opts: SourceOptions, dirty_passes: usize) {
    let total = total_mib * 256;
    let layout = MemoryLayout::x86(total_mib << 20).unwrap();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut smem = MemPages::new(vec![0; (total as usize) * PAGE_SIZE]);
    // The last 1/16 of memory is never touched (a memfd hole).
    let hole_start = total - total / 16;
    for block in 0..hole_start / 16 {
        let kind = rng.below(3);
        for p in block * 16..block * 16 + 16 {
            fill_page(smem.page_mut(p), kind, &mut rng);
        }
    }
    // The destination starts with garbage, so zero runs must really zero.
    let mut dmem = MemPages::new(vec![0x5A; (total as usize) * PAGE_SIZE]);

    let compress = opts.compress;
    let mut src = SourceSession::new(layout.clone(), opts).unwrap();
    let mut dest = DestinationSession::new(DestOptions {
        auto_accept: true,
        ..DestOptions::default()
    });
    let mut wire = Wire::new(3);
    let mut hello = Vec::new();
    src.hello(&mut hello).unwrap();
    let actions = dest.feed(&hello, &mut dmem).unwrap();
    assert_eq!(dest.layout(), Some(&layout));
    let events = reply_to_source(&mut src, &smem, &actions);
    assert!(matches!(events[..], [SourceEvent::Accepted(_)]));

    let end0 = run_pass(
        &mut src,
        &mut dest,
        &mut wire,
        &smem,
        &mut dmem,
        &[PageRange::new(0, hole_start)],
        &[PageRange::new(hole_start, total - hole_start)],
    );
    assert_eq!(end0.pages_sent + end0.zero_pages, total);
    assert!(end0.zero_pages >= total - hole_start);
    assert!(end0.pages_sent > 0);

    for _ in 0..dirty_passes {
        let mut dirty = BTreeSet::new();
        for _ in 0..total / 20 {
            let p = rng.below(total);
            dirty.insert(p);
            let kind = rng.below(3);
            fill_page(smem.page_mut(p), kind, &mut rng);
        }
        let end = run_pass(
            &mut src,
            &mut dest,
            &mut wire,
            &smem,
            &mut dmem,
            &page_runs(dirty.iter().copied()),
            &[],
        );
        assert_eq!(end.pages_sent + end.zero_pages, dirty.len() as u64);
    }

    let stats = src.pass_stats();
    assert_eq!(stats.len(), dirty_passes + 1);
    if compress {
        assert!(stats[0].compressed_batches > 0);
        assert!(stats[0].compression_ratio() > 1.5, "{:?}", stats[0]);
    } else {
        assert_eq!(stats[0].compressed_batches, 0);
    }

    // Stop-and-copy: state and switchover, then the destination resumes.
    let blob: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
    let mut ctl = Vec::new();
    src.send_state(&blob, false, &mut ctl).unwrap();
    let actions = deliver(&mut dest, &mut wire.control, &ctl, &mut dmem);
    assert!(actions.contains(&DestAction::StateReceived(blob)));
    assert!(actions.contains(&DestAction::SwitchedOver { postcopy: false }));
    assert_eq!(
        reply_to_source(&mut src, &smem, &actions),
        [SourceEvent::StateAcked]
    );
    let done = dest.resumed().unwrap();
    let mut out = Vec::new();
    assert_eq!(
        src.handle(done, &smem, &mut out).unwrap(),
        Some(SourceEvent::Done)
    );
    assert_eq!(src.state(), SourceState::Done);
    assert_eq!(dest.state(), DestState::Done);
    // Compare page by page for a useful message, then the whole thing.
    for p in 0..total {
        assert!(smem.page(p) == dmem.page(p), "page {p} differs");
    }
    assert!(smem.0 == dmem.0);
}

#[test]
fn migrates_256_mib_with_dirty_passes_compressed() {
    migrate(
        256,
        SourceOptions {
            compress: true,
            batch_pages: 64,
            ..SourceOptions::default()
        },
        3,
    );
}

#[test]
fn migrates_without_compression_and_full_batches() {
    migrate(
        16,
        SourceOptions {
            compress: false,
            batch_pages: 128,
            ..SourceOptions::default()
        },
        2,
    );
}

/// A source and an accepted destination over a small layout, with pass 0
/// open and its frames encoded.
fn small_setup(compress: bool) -> (SourceSession, DestinationSession, MemPages, Vec<Vec<u8>>) {
    let layout = MemoryLayout::x86(64 * PAGE_SIZE as u64).unwrap();
    let mut rng = Rng(42);
    let mut mem = MemPages::new(vec![0; 64 * PAGE_SIZE]);
    for p in 0..64 {
        fill_page(mem.page_mut(p), 1 + p % 2, &mut rng);
    }
    let mut src = SourceSession::new(
        layout,
        SourceOptions {
            compress,
            batch_pages: 8,
            postcopy: true,
            ..SourceOptions::default()
        },
    )
    .unwrap();
    let mut dest = DestinationSession::new(DestOptions {
        auto_accept: true,
        ..DestOptions::default()
    });
    let mut out = Vec::new();
    src.hello(&mut out).unwrap();
    let actions = dest.feed(&out, &mut Recorder::default()).unwrap();
    reply_to_source(&mut src, &mem, &actions);
    let mut ctl = Vec::new();
    src.begin_pass(&[PageRange::new(0, 64)], &[], &mut ctl)
        .unwrap();
    dest.feed(&ctl, &mut Recorder::default()).unwrap();
    let mut frames = Vec::new();
    loop {
        let mut f = Vec::new();
        if src.next_frame(&mem, &mut f).unwrap().is_none() {
            break;
        }
        frames.push(f);
    }
    (src, dest, mem, frames)
}

#[test]
fn corrupted_body_aborts_with_bad_crc_and_writes_nothing() {
    for compress in [false, true] {
        let (_src, mut dest, _mem, frames) = small_setup(compress);
        let mut sink = Recorder::default();
        dest.feed(&frames[0], &mut sink).unwrap();
        let written = sink.0.len();
        assert!(written > 0);
        let mut bad = frames[1].clone();
        let mid = HEADER_LEN + (bad.len() - HEADER_LEN) / 2;
        bad[mid] ^= 0x10;
        let err = dest.feed(&bad, &mut sink).unwrap_err();
        assert_eq!(err.reason(), ReasonCode::BadCrc);
        assert!(matches!(
            err.abort_frame(),
            Some(Frame::Abort {
                code: ReasonCode::BadCrc,
                ..
            })
        ));
        assert_eq!(sink.0.len(), written, "nothing from the bad frame");
        assert_eq!(dest.state(), DestState::Failed);
        // A failed session takes nothing more.
        assert!(matches!(
            dest.feed(&frames[2], &mut sink),
            Err(DestError::Failed)
        ));
        assert_eq!(sink.0.len(), written);
    }
}

/// Feeds `bytes` to `fb` in datagram-sized chunks (as quinn hands a
/// stream over) and every complete frame to the session.
fn feed_in_chunks(
    dest: &mut DestinationSession,
    fb: &mut FrameBuffer,
    bytes: &[u8],
    sink: &mut ByteMem,
) -> Result<(), ReasonCode> {
    for chunk in bytes.chunks(5952) {
        fb.push_chunk(bytes::Bytes::copy_from_slice(chunk));
        while let Some(f) = fb.next_frame().map_err(|e| e.reason())? {
            dest.handle(f, sink).map_err(|e| e.reason())?;
        }
    }
    Ok(())
}

/// A raw batch that arrived in chunks cut inside pages goes to a sink that
/// takes byte ranges chunk by chunk, with no page gathered first, and
/// lands exactly; a bad CRC still writes nothing of its frame.
#[test]
fn a_batch_cut_inside_pages_is_written_piece_by_piece() {
    let (_src, mut dest, mem, frames) = small_setup(false);
    let mut sink = ByteMem::new(mem.0.len());
    let mut fb = FrameBuffer::new();
    let stream: Vec<u8> = frames.concat();
    feed_in_chunks(&mut dest, &mut fb, &stream, &mut sink).unwrap();
    assert!(sink.mem.0 == mem.0, "destination memory differs");
    assert_eq!(sink.page_writes, 0, "no page-granular writes");
    let cut = sink
        .byte_writes
        .iter()
        .filter(|&&(at, len)| at % PAGE_SIZE as u64 != 0 || len % PAGE_SIZE != 0)
        .count();
    assert!(cut > 0, "some pieces start or end inside a page");
    // Every byte written once: the pieces cover the batches exactly.
    let total: usize = sink.byte_writes.iter().map(|w| w.1).sum();
    assert_eq!(total, mem.0.len());

    // Same pass to a fresh destination, one batch body corrupted.
    let (_src, mut dest, _mem, frames) = small_setup(false);
    let mut sink = ByteMem::new(mem.0.len());
    let mut fb = FrameBuffer::new();
    feed_in_chunks(&mut dest, &mut fb, &frames[0], &mut sink).unwrap();
    let written = sink.byte_writes.len();
    assert!(written > 0);
    let mut bad = frames[1].clone();
    let mid = HEADER_LEN + (bad.len() - HEADER_LEN) / 2;
    bad[mid] ^= 0x10;
    let err = feed_in_chunks(&mut dest, &mut fb, &bad, &mut sink).unwrap_err();
    assert_eq!(err, ReasonCode::BadCrc);
    assert_eq!(
        sink.byte_writes.len(),
        written,
        "nothing from the bad frame"
    );
    assert!(sink.mem.0[8 * PAGE_SIZE..].iter().all(|&b| b == 0x5A));
}

#[test]
fn out_of_range_batch_aborts_with_out_of_range() {
    let (_src, mut dest, _mem, _frames) = small_setup(false);
    let mut sink = Recorder::default();
    // Starts inside the layout, ends one page past it.
    let frame = Frame::PageBatch(PageBatch {
        pass: 0,
        set: PageSet::Run {
            first: PageIndex(60),
            count: 5,
        },
        data: vec![1; 5 * PAGE_SIZE].into(),
    });
    let err = dest
        .feed(&frame.to_bytes().unwrap(), &mut sink)
        .unwrap_err();
    assert_eq!(err.reason(), ReasonCode::OutOfRange);
    assert!(matches!(
        err.abort_frame(),
        Some(Frame::Abort {
            code: ReasonCode::OutOfRange,
            ..
        })
    ));
    assert!(sink.0.is_empty());

    let (_src, mut dest, _mem, _frames) = small_setup(false);
    let zero = Frame::ZeroRun {
        pass: 0,
        start: PageIndex(64),
        count: 1,
    };
    let err = dest.handle(zero, &mut sink).unwrap_err();
    assert_eq!(err.reason(), ReasonCode::OutOfRange);
    assert!(sink.0.is_empty());
}

#[test]
fn pages_before_hello_are_a_protocol_error() {
    let mut dest = DestinationSession::new(DestOptions::default());
    let mut sink = Recorder::default();
    let frame = Frame::ZeroRun {
        pass: 0,
        start: PageIndex(0),
        count: 1,
    };
    let err = dest
        .feed(&frame.to_bytes().unwrap(), &mut sink)
        .unwrap_err();
    assert!(matches!(
        err,
        DestError::Unexpected {
            frame: FrameType::ZeroRun,
            state: DestState::AwaitHello
        }
    ));
    assert_eq!(err.reason(), ReasonCode::Protocol);
    assert!(sink.0.is_empty());
}

#[test]
fn hello_needs_explicit_accept_and_refuse_is_sent() {
    let layout = MemoryLayout::x86(1 << 20).unwrap();
    let mut src = SourceSession::new(layout, SourceOptions::default()).unwrap();
    let mut dest = DestinationSession::new(DestOptions::default());
    let mut out = Vec::new();
    src.hello(&mut out).unwrap();
    let actions = dest.feed(&out, &mut Recorder::default()).unwrap();
    assert!(matches!(actions[..], [DestAction::HelloReceived(_)]));
    assert_eq!(dest.state(), DestState::AwaitAccept);
    let refuse = dest.refuse(ReasonCode::NotEnoughMemory, "only 512 MiB free");
    let mem = MemPages::new(vec![0; 256 * PAGE_SIZE]);
    let err = src.handle(refuse, &mem, &mut out).unwrap_err();
    assert!(matches!(
        err,
        SourceError::Refused {
            code: ReasonCode::NotEnoughMemory,
            ..
        }
    ));
    assert!(err.abort_frame().is_none());
    assert_eq!(src.state(), SourceState::Failed);
}

#[test]
fn version_mismatch_is_refused() {
    let layout = MemoryLayout::x86(1 << 20).unwrap();
    let mut src = SourceSession::new(layout, SourceOptions::default()).unwrap();
    let mut out = Vec::new();
    src.hello(&mut out).unwrap();
    let (Frame::Hello(mut h), _) = decode(&out).unwrap().unwrap() else {
        panic!("not a hello");
    };
    h.version = 99;
    let mut dest = DestinationSession::new(DestOptions {
        auto_accept: true,
        ..DestOptions::default()
    });
    let actions = dest
        .handle(Frame::Hello(h), &mut Recorder::default())
        .unwrap();
    assert!(matches!(
        &actions[..],
        [DestAction::Send(Frame::Refuse {
            code: ReasonCode::VersionMismatch,
            ..
        })]
    ));
    assert_eq!(dest.state(), DestState::Refused);
}

#[test]
fn misordered_frames_are_protocol_errors() {
    // A page frame for a future pass.
    let (_src, mut dest, _mem, _) = small_setup(false);
    let f = Frame::ZeroRun {
        pass: 1,
        start: PageIndex(0),
        count: 1,
    };
    let err = dest.handle(f, &mut Recorder::default()).unwrap_err();
    assert!(matches!(
        err,
        DestError::WrongPass {
            got: 1,
            expected: 0
        }
    ));

    // More pages than PassEnd announced.
    let (_src, mut dest, _mem, frames) = small_setup(false);
    let mut sink = Recorder::default();
    let end = Frame::PassEnd(PassEnd {
        pass: 0,
        pages_sent: 1,
        zero_pages: 0,
        bytes: 0,
    });
    dest.handle(end, &mut sink).unwrap();
    let err = dest.feed(&frames[0], &mut sink).unwrap_err();
    assert!(matches!(err, DestError::PassOverflow { pass: 0, .. }));
    assert!(sink.0.is_empty());

    // State while a pass is still open, and the source refusing to send
    // state before the pass is acked.
    let (mut src, mut dest, _mem, frames) = small_setup(false);
    dest.feed(&frames[0], &mut sink).unwrap();
    let err = src.send_state(b"x", false, &mut Vec::new()).unwrap_err();
    assert!(matches!(err, SourceError::WrongState { .. }));
    let err = dest
        .handle(Frame::State { blob: vec![1] }, &mut sink)
        .unwrap_err();
    assert_eq!(err.reason(), ReasonCode::Protocol);
}

#[test]
fn no_pages_after_switchover_and_postcopy_requests() {
    for postcopy in [false, true] {
        let (mut src, mut dest, mem, frames) = small_setup(false);
        let mut sink = Recorder::default();
        let mut ctl = Vec::new();
        src.end_pass(&mut ctl).unwrap();
        let mut actions = Vec::new();
        for f in &frames {
            actions.extend(dest.feed(f, &mut sink).unwrap());
        }
        actions.extend(dest.feed(&ctl, &mut sink).unwrap());
        reply_to_source(&mut src, &mem, &actions);
        assert_eq!(src.state(), SourceState::Idle);
        let mut ctl = Vec::new();
        src.send_state(b"state", postcopy, &mut ctl).unwrap();
        let actions = dest.feed(&ctl, &mut sink).unwrap();
        assert!(actions.contains(&DestAction::SwitchedOver { postcopy }));
        let written = sink.0.len();
        if !postcopy {
            let err = dest.feed(&frames[0], &mut sink).unwrap_err();
            assert_eq!(err.reason(), ReasonCode::Protocol);
            assert_eq!(sink.0.len(), written);
            continue;
        }
        // Post-copy: a fault becomes a request, the source answers it.
        let req = dest.request_pages(PageIndex(5), 3).unwrap();
        let mut reply = Vec::new();
        let ev = src.handle(req, &mem, &mut reply).unwrap();
        assert_eq!(
            ev,
            Some(SourceEvent::PageServed {
                id: 0,
                index: PageIndex(5),
                count: 3
            })
        );
        let actions = dest.feed(&reply, &mut sink).unwrap();
        assert_eq!(
            actions,
            [DestAction::PageReplyReceived {
                id: 0,
                index: PageIndex(5),
                count: 3
            }]
        );
        assert_eq!(&sink.0[written..], &[(5, 1), (6, 1), (7, 1)]);
        // A second reply to the same request is refused.
        let err = dest.feed(&reply, &mut sink).unwrap_err();
        assert!(matches!(err, DestError::UnknownRequest { id: 0 }));
    }
}

#[test]
fn peer_abort_ends_both_sides_without_echo() {
    let (mut src, mut dest, mem, _frames) = small_setup(false);
    let mut out = Vec::new();
    src.abort(ReasonCode::Cancelled, "operator cancelled", &mut out);
    assert_eq!(src.state(), SourceState::Failed);
    let err = dest.feed(&out, &mut Recorder::default()).unwrap_err();
    assert!(matches!(
        err,
        DestError::PeerAborted {
            code: ReasonCode::Cancelled,
            ..
        }
    ));
    assert!(err.abort_frame().is_none());
    let abort = Frame::Abort {
        code: ReasonCode::NotEnoughMemory,
        message: String::new(),
    };
    let (mut src, ..) = small_setup(false);
    let err = src.handle(abort, &mem, &mut out).unwrap_err();
    assert_eq!(err.reason(), ReasonCode::NotEnoughMemory);
    // An ack for a pass that is not awaited is a protocol error.
    let (mut src, ..) = small_setup(false);
    let err = src
        .handle(Frame::Ack(AckWhat::Pass(7)), &mem, &mut out)
        .unwrap_err();
    assert_eq!(err.reason(), ReasonCode::Protocol);
}

/// Writes the fuzz seed corpus (run with `--ignored` after a wire change):
/// a few small valid frames for `decode`, and whole small migrations as
/// byte streams for `destination` (first byte: the fuzz target's chunking).
#[test]
#[ignore]
fn write_fuzz_corpus() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    let layout = MemoryLayout::x86(16 * PAGE_SIZE as u64).unwrap();
    let mut rng = Rng(7);
    let mut mem = MemPages::new(vec![0; 16 * PAGE_SIZE]);
    // Pages 12..16 stay zero: they are sent as a known-zero range.
    for p in 0..12u64 {
        fill_page(mem.page_mut(p), [0, 1, 2, 2][p as usize % 4], &mut rng);
    }
    let mut streams = Vec::new();
    for (compress, batch) in [(false, 2), (true, 4)] {
        let mut src = SourceSession::new(
            layout.clone(),
            SourceOptions {
                compress,
                batch_pages: batch,
                host: "src".into(),
                migration_id: "m1".into(),
                vm_name: "vm".into(),
                ..SourceOptions::default()
            },
        )
        .unwrap();
        let mut dest = DestinationSession::new(DestOptions {
            auto_accept: true,
            ..DestOptions::default()
        });
        let mut stream = vec![if compress { 3 } else { 255 }];
        let mut out = Vec::new();
        src.hello(&mut out).unwrap();
        let mut sink = MemPages::new(vec![0; 16 * PAGE_SIZE]);
        for a in dest.feed(&out, &mut sink).unwrap() {
            if let DestAction::Send(f) = a {
                src.handle(f, &mem, &mut Vec::new()).unwrap();
            }
        }
        stream.append(&mut out);
        let dirty = [PageRange::new(0, 12)];
        let dirty2 = [PageRange::new(1, 2), PageRange::new(9, 1)];
        for (pages, zero) in [
            (&dirty[..], &[PageRange::new(12, 4)][..]),
            (&dirty2[..], &[][..]),
        ] {
            src.begin_pass(pages, zero, &mut out).unwrap();
            while src.next_frame(&mem, &mut out).unwrap().is_some() {}
            src.end_pass(&mut out).unwrap();
            for a in dest.feed(&out, &mut sink).unwrap() {
                if let DestAction::Send(f) = a {
                    src.handle(f, &mem, &mut Vec::new()).unwrap();
                }
            }
            stream.append(&mut out);
        }
        src.send_state(b"vcpu+devices", false, &mut out).unwrap();
        dest.feed(&out, &mut sink).unwrap();
        stream.append(&mut out);
        assert!(mem.0 == sink.0);
        streams.push(stream);
    }
    let dir = root.join("destination");
    std::fs::create_dir_all(&dir).unwrap();
    for (i, s) in streams.iter().enumerate() {
        std::fs::write(dir.join(format!("seed-{i:02}")), s).unwrap();
    }
    // Single frames for `decode`: split the first stream, plus the frames
    // a migration stream does not contain.
    let mut frames = Vec::new();
    let mut rest = &streams[1][1..];
    while let Some((_, n)) = decode(rest).unwrap() {
        frames.push(rest[..n].to_vec());
        rest = &rest[n..];
    }
    // The second pass resends unchanged cached pages: XOR deltas.
    assert!(frames.iter().any(|f| f[0] == FrameType::XorPageBatch as u8));
    for f in [
        Frame::PageRequest {
            id: 1,
            index: PageIndex(3),
            count: 2,
        },
        Frame::PageReply {
            id: 1,
            index: PageIndex(3),
            data: vec![9; PAGE_SIZE].into(),
        },
        Frame::PageBatch(PageBatch {
            pass: 1,
            set: PageSet::List {
                first: PageIndex(2),
                offsets: vec![0, 3],
            },
            data: vec![1; 2 * PAGE_SIZE].into(),
        }),
        Frame::Abort {
            code: ReasonCode::BadCrc,
            message: "bad crc".into(),
        },
        Frame::Done,
    ] {
        frames.push(f.to_bytes().unwrap());
    }
    let dir = root.join("decode");
    std::fs::create_dir_all(&dir).unwrap();
    for (i, f) in frames.iter().enumerate() {
        std::fs::write(dir.join(format!("seed-{i:02}")), f).unwrap();
    }
}

/// Throughput of the whole page path (read page → frame → decode → sink),
/// per content kind and batch size, next to plain memcpy. Run with
/// `cargo test --release -p transport --test session -- --ignored --nocapture bench`.
#[test]
#[ignore]
fn bench_page_path() {
    use std::time::Instant;
    const MIB: u64 = 64;
    let total = MIB * 256;
    let layout = MemoryLayout::x86(MIB << 20).unwrap();
    let gib = |bytes: u64, secs: f64| bytes as f64 / secs / (1u64 << 30) as f64;
    let mut rng = Rng(3);

    let src_mem = MemPages::new(
        (0..total as usize * PAGE_SIZE / 8)
            .flat_map(|_| rng.next().to_le_bytes())
            .collect(),
    );
    let mut dst = vec![0u8; src_mem.0.len()];
    let t = Instant::now();
    for _ in 0..4 {
        dst.copy_from_slice(std::hint::black_box(&src_mem.0));
    }
    let memcpy = gib(4 * total * PAGE_SIZE as u64, t.elapsed().as_secs_f64());
    println!("memcpy: {memcpy:.2} GiB/s");
    println!(
        "{:<14} {:>6} {:>10} {:>10} {:>8}",
        "content", "batch", "GiB/s", "wire/raw", "zstd"
    );

    for kind in ["raw", "compressible", "incompressible", "zero"] {
        let mut mem = MemPages::new(vec![0; total as usize * PAGE_SIZE]);
        for p in 0..total {
            match kind {
                "compressible" => fill_page(mem.page_mut(p), 2, &mut rng),
                "zero" => {}
                _ => fill_page(mem.page_mut(p), 1, &mut rng),
            }
        }
        for batch in [32, 64, 128] {
            let compress = matches!(kind, "compressible" | "incompressible");
            let mut src = SourceSession::new(
                layout.clone(),
                SourceOptions {
                    compress,
                    batch_pages: batch,
                    ..SourceOptions::default()
                },
            )
            .unwrap();
            let mut dest = DestinationSession::new(DestOptions {
                auto_accept: true,
                ..DestOptions::default()
            });
            // Non-zero fill touches every page, so page faults of the first
            // write are not part of the measurement (memcpy has none either).
            let mut sink = MemPages::new(vec![0x5A; total as usize * PAGE_SIZE]);
            let mut out = Vec::new();
            src.hello(&mut out).unwrap();
            for a in dest.feed(&out, &mut sink).unwrap() {
                if let DestAction::Send(f) = a {
                    src.handle(f, &mem, &mut Vec::new()).unwrap();
                }
            }
            out.clear();
            let t = Instant::now();
            src.begin_pass(&[PageRange::new(0, total)], &[], &mut out)
                .unwrap();
            dest.feed(&out, &mut sink).unwrap();
            let mut wire = 0;
            loop {
                out.clear();
                if src.next_frame(&mem, &mut out).unwrap().is_none() {
                    break;
                }
                wire += out.len() as u64;
                let (f, _) = decode(&out).unwrap().unwrap();
                dest.handle(f, &mut sink).unwrap();
            }
            let secs = t.elapsed().as_secs_f64();
            let s = src.end_pass(&mut Vec::new()).unwrap();
            assert!(sink.0 == mem.0);
            let raw = total * PAGE_SIZE as u64;
            println!(
                "{kind:<14} {batch:>6} {:>10.2} {:>10.3} {:>8}",
                gib(raw, secs),
                wire as f64 / raw as f64,
                s.compressed_batches
            );
        }
    }
}
