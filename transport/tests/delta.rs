//! XOR delta encoding of dirty passes, in memory between a `SourceSession`
//! and a `DestinationSession`: wire savings on sparse dirtying, identical
//! memory with caches smaller than the dirty set, runtime switching, and
//! the destination's rejection of bad deltas (CRC, no base) without writing
//! anything.

use std::io;

use transport::codec::{
    Capabilities, Frame, FrameBuffer, FrameType, PageSet, ReasonCode, XorPageBatch,
};
use transport::layout::{MemoryLayout, PageIndex, PageRange, PAGE_SIZE};
use transport::session::{
    Compression, DestAction, DestError, DestOptions, DestState, DestinationSession, PageSink,
    PageSource, PassStats, SourceOptions, SourceSession,
};
use transport::testing::{page_runs, MemPages, Rng};

/// Guest memory that counts page writes.
#[derive(Clone)]
struct Mem {
    bytes: MemPages,
    writes: u64,
}

impl Mem {
    fn new(pages: u64) -> Self {
        Self {
            bytes: MemPages::zeroed(pages),
            writes: 0,
        }
    }
    fn page_mut(&mut self, i: u64) -> &mut [u8] {
        self.bytes.page_mut(i)
    }
    fn pages(&self) -> u64 {
        self.bytes.pages()
    }
}

impl PageSource for Mem {
    fn read_page(&self, index: PageIndex, out: &mut [u8; PAGE_SIZE]) -> io::Result<()> {
        self.bytes.read_page(index, out)
    }
}

impl PageSink for Mem {
    fn write_page(&mut self, index: PageIndex, data: &[u8; PAGE_SIZE]) -> io::Result<()> {
        self.writes += 1;
        self.bytes.write_page(index, data)
    }
    fn write_zero(&mut self, start: PageIndex, count: u64) -> io::Result<()> {
        self.writes += count;
        self.bytes.write_zero(start, count)
    }
    fn read_back(&self, index: PageIndex, out: &mut [u8; PAGE_SIZE]) -> io::Result<()> {
        self.bytes.read_back(index, out)
    }
}

/// Random bytes in every page: zstd cannot shrink them, so only deltas can.
fn random_mem(pages: u64, rng: &mut Rng) -> Mem {
    let mut m = Mem::new(pages);
    for c in m.bytes.0.chunks_exact_mut(8) {
        c.copy_from_slice(&rng.next().to_le_bytes());
    }
    m
}

/// Changes 8 bytes at a random place in `count` distinct random pages;
/// returns the dirtied pages as sorted ranges.
fn dirty_sparsely(mem: &mut Mem, count: u64, rng: &mut Rng) -> Vec<PageRange> {
    let mut pages: Vec<u64> = Vec::new();
    let total = mem.pages();
    while (pages.len() as u64) < count {
        let p = rng.below(total);
        if !pages.contains(&p) {
            pages.push(p);
        }
    }
    pages.sort_unstable();
    for &p in &pages {
        let at = rng.below(PAGE_SIZE as u64 / 8) as usize * 8;
        let v = rng.next().to_le_bytes();
        mem.page_mut(p)[at..at + 8].copy_from_slice(&v);
    }
    page_runs(pages)
}

/// A source and a destination session wired together in memory.
struct Pair {
    src: SourceSession,
    dst: DestinationSession,
    control: FrameBuffer,
    bulk: FrameBuffer,
}

impl Pair {
    fn new(pages: u64, opts: SourceOptions, dest_caps: Capabilities, src_mem: &Mem) -> Self {
        let layout = MemoryLayout::x86(pages * PAGE_SIZE as u64).unwrap();
        let mut pair = Self {
            src: SourceSession::new(layout, opts).unwrap(),
            dst: DestinationSession::new(DestOptions {
                auto_accept: true,
                capabilities: dest_caps,
                ..DestOptions::default()
            }),
            control: FrameBuffer::new(),
            bulk: FrameBuffer::new(),
        };
        let mut out = Vec::new();
        pair.src.hello(&mut out).unwrap();
        let mut sink = Mem::new(pages);
        let actions = pair.send_dest(true, &out, &mut sink).unwrap();
        pair.send_source(actions, src_mem);
        pair
    }

    fn send_dest(
        &mut self,
        control: bool,
        bytes: &[u8],
        sink: &mut Mem,
    ) -> Result<Vec<DestAction>, DestError> {
        let fb = if control {
            &mut self.control
        } else {
            &mut self.bulk
        };
        fb.push(bytes);
        let mut actions = Vec::new();
        while let Some(f) = fb.next_frame()? {
            actions.extend(self.dst.handle(f, sink)?);
        }
        Ok(actions)
    }

    fn send_source(&mut self, actions: Vec<DestAction>, src_mem: &Mem) {
        for a in actions {
            if let DestAction::Send(f) = a {
                let mut out = Vec::new();
                self.src.handle(f, src_mem, &mut out).unwrap();
            }
        }
    }

    /// Runs one whole pass over `pages`; returns its stats and the frame
    /// types sent.
    fn pass(
        &mut self,
        pages: &[PageRange],
        src_mem: &Mem,
        dst_mem: &mut Mem,
    ) -> (PassStats, Vec<FrameType>) {
        let mut out = Vec::new();
        self.src.begin_pass(pages, &[], &mut out).unwrap();
        let mut actions = self.send_dest(true, &out, dst_mem).unwrap();
        let mut types = Vec::new();
        loop {
            out.clear();
            let Some(_) = self.src.next_frame(src_mem, &mut out).unwrap() else {
                break;
            };
            // One call may append two frames; record every one.
            let mut at = 0;
            while at < out.len() {
                let h = transport::codec::peek_header(&out[at..]).unwrap().unwrap();
                types.push(h.frame_type);
                at += h.frame_len();
            }
            actions.extend(self.send_dest(false, &out, dst_mem).unwrap());
        }
        out.clear();
        let stats = self.src.end_pass(&mut out).unwrap();
        actions.extend(self.send_dest(true, &out, dst_mem).unwrap());
        assert!(
            actions
                .iter()
                .any(|a| matches!(a, DestAction::PassComplete(e) if e.pass == stats.pass)),
            "pass {} completed",
            stats.pass
        );
        self.send_source(actions, src_mem);
        (stats, types)
    }
}

fn opts(compress: bool, delta_cache_bytes: u64) -> SourceOptions {
    SourceOptions {
        compress,
        delta_cache_bytes,
        ..SourceOptions::default()
    }
}

const PAGES: u64 = 2048;

fn all() -> Vec<PageRange> {
    vec![PageRange::new(0, PAGES)]
}

/// Pass 0 then three sparse dirty passes; returns the dirty passes' stats.
fn sparse_migration(compress: bool, cache: u64, seed: u64) -> Vec<PassStats> {
    let mut rng = Rng(seed);
    let mut src = random_mem(PAGES, &mut rng);
    let mut dst = Mem::new(PAGES);
    let mut pair = Pair::new(PAGES, opts(compress, cache), Capabilities::SUPPORTED, &src);
    pair.pass(&all(), &src, &mut dst);
    let mut dirty_stats = Vec::new();
    for _ in 0..3 {
        let dirty = dirty_sparsely(&mut src, 1000, &mut rng);
        let (stats, _) = pair.pass(&dirty, &src, &mut dst);
        assert_eq!(stats.pages, 1000);
        dirty_stats.push(stats);
    }
    assert!(src.bytes == dst.bytes, "memory differs after migration");
    dirty_stats
}

#[test]
fn sparse_dirty_passes_shrink_at_least_tenfold() {
    for compress in [true, false] {
        let with = sparse_migration(compress, 64 << 20, 7);
        let without = sparse_migration(compress, 0, 7);
        for (d, r) in with.iter().zip(&without) {
            assert_eq!(r.delta_pages, 0);
            assert_eq!(d.delta_pages, 1000, "every dirty page was cached: {d:?}");
            assert_eq!(d.delta_in, 1000 * PAGE_SIZE as u64);
            assert!(d.delta_wire_bytes <= d.wire_bytes);
            assert!(
                d.wire_bytes * 10 <= r.wire_bytes,
                "zstd {compress}: delta pass {} bytes vs {} without deltas",
                d.wire_bytes,
                r.wire_bytes
            );
            // Random pages: without deltas the pass costs the raw pages.
            assert!(r.wire_bytes >= 1000 * PAGE_SIZE as u64);
        }
    }
}

#[test]
fn cache_smaller_than_the_dirty_set_still_ends_identical() {
    let mut rng = Rng(99);
    let mut src = random_mem(PAGES, &mut rng);
    let mut dst = Mem::new(PAGES);
    // 32 slots for 500 dirty pages per pass over 2048 pages.
    let mut pair = Pair::new(
        PAGES,
        opts(true, 32 * PAGE_SIZE as u64),
        Capabilities::SUPPORTED,
        &src,
    );
    pair.pass(&all(), &src, &mut dst);
    let (mut deltas, mut misses) = (0, 0);
    for round in 0..6 {
        // Alternate sparse dirtying with rewriting a hot range wholesale,
        // and zero some pages, so cached versions go stale in every way.
        let dirty = if round % 2 == 0 {
            dirty_sparsely(&mut src, 500, &mut rng)
        } else {
            for p in 100..140 {
                let kind = rng.below(3);
                for c in src.page_mut(p).chunks_exact_mut(8) {
                    let v = if kind == 0 { 0 } else { rng.next() };
                    c.copy_from_slice(&v.to_le_bytes());
                }
            }
            vec![PageRange::new(100, 40)]
        };
        let (stats, _) = pair.pass(&dirty, &src, &mut dst);
        deltas += stats.delta_pages;
        misses += stats.delta_cache_misses;
        assert!(src.bytes == dst.bytes, "memory differs after round {round}");
    }
    assert!(deltas > 0, "some dirty pages were still cached");
    assert!(misses > 0, "the cache cannot hold the dirty set");
}

#[test]
fn zeroed_then_rewritten_page_is_not_a_delta_against_stale_data() {
    let mut rng = Rng(5);
    let mut src = random_mem(64, &mut rng);
    let mut dst = Mem::new(64);
    let mut pair = Pair::new(64, opts(true, 1 << 20), Capabilities::SUPPORTED, &src);
    pair.pass(&[PageRange::new(0, 64)], &src, &mut dst);
    src.page_mut(3).fill(0);
    let (s, types) = pair.pass(&[PageRange::new(3, 1)], &src, &mut dst);
    assert_eq!((s.zero_pages, types), (1, vec![FrameType::ZeroRun]));
    src.page_mut(3)[10] = 1;
    let (s, types) = pair.pass(&[PageRange::new(3, 1)], &src, &mut dst);
    assert_eq!(s.delta_pages, 0);
    assert_ne!(types, vec![FrameType::XorPageBatch]);
    src.page_mut(3)[11] = 2;
    let (s, types) = pair.pass(&[PageRange::new(3, 1)], &src, &mut dst);
    assert_eq!(s.delta_pages, 1);
    assert_eq!(types, vec![FrameType::XorPageBatch]);
    assert!(src.bytes == dst.bytes);
}

#[test]
fn compression_switches_at_runtime() {
    let mut rng = Rng(11);
    let mut src = random_mem(PAGES, &mut rng);
    // Half the pages compressible so zstd shows up in the stats.
    for p in 0..PAGES / 2 {
        src.page_mut(p).fill(p as u8);
        src.page_mut(p)[0] = 1;
    }
    let mut dst = Mem::new(PAGES);
    let mut pair = Pair::new(PAGES, opts(true, 64 << 20), Capabilities::SUPPORTED, &src);
    let (s, _) = pair.pass(&all(), &src, &mut dst);
    assert!(s.compressed_batches > 0);

    pair.src
        .set_compression(Compression {
            zstd: false,
            delta: false,
        })
        .unwrap();
    let dirty = dirty_sparsely(&mut src, 300, &mut rng);
    let (s, types) = pair.pass(&dirty, &src, &mut dst);
    assert_eq!((s.delta_pages, s.compressed_batches), (0, 0));
    assert!(
        types.iter().all(|t| *t == FrameType::PageBatch),
        "{types:?}"
    );

    // Deltas back on: the cache starts empty (it was dropped, not kept up
    // to date, while deltas were off), so the next pass sends whole pages
    // and fills it, and the one after goes as deltas.
    pair.src
        .set_compression(Compression {
            zstd: false,
            delta: true,
        })
        .unwrap();
    let (s, _) = pair.pass(&dirty, &src, &mut dst);
    assert_eq!((s.delta_pages, s.delta_cache_misses), (0, 300));
    for r in &dirty {
        for p in r.start.0..r.start.0 + r.count {
            src.page_mut(p)[7] ^= 0x40;
        }
    }
    let (s, _) = pair.pass(&dirty, &src, &mut dst);
    assert_eq!(s.delta_pages, 300);
    assert_eq!(s.compressed_batches, 0);
    assert!(src.bytes == dst.bytes);
}

#[test]
fn peers_without_xor_delta_never_see_deltas() {
    let mut rng = Rng(3);
    let mut src = random_mem(256, &mut rng);
    let mut dst = Mem::new(256);
    let caps = Capabilities::ZSTD | Capabilities::POSTCOPY;
    let mut pair = Pair::new(256, opts(true, 64 << 20), caps, &src);
    assert!(!pair.src.capabilities().contains(Capabilities::XOR_DELTA));
    pair.pass(&[PageRange::new(0, 256)], &src, &mut dst);
    let dirty = dirty_sparsely(&mut src, 100, &mut rng);
    let (s, types) = pair.pass(&dirty, &src, &mut dst);
    assert_eq!(s.delta_pages, 0);
    assert!(!types.contains(&FrameType::XorPageBatch));
    assert!(src.bytes == dst.bytes);

    // And a delta sent anyway is out of protocol.
    let mut out = Vec::new();
    pair.src.begin_pass(&[], &[], &mut out).unwrap();
    pair.send_dest(true, &out, &mut dst).unwrap();
    let frame = xor_frame(s.pass + 1, 5, &dst, &src, None);
    let err = pair.dst.handle(frame, &mut dst).unwrap_err();
    assert!(matches!(
        err,
        DestError::Unexpected {
            frame: FrameType::XorPageBatch,
            ..
        }
    ));
    assert_eq!(err.reason(), ReasonCode::Protocol);
}

/// An `XorPageBatch` for pages `first..first + 2` taking `base` to `target`,
/// with the second page's CRC replaced by `bad_crc` if given.
fn xor_frame(pass: u32, first: u64, base: &Mem, target: &Mem, bad_crc: Option<u32>) -> Frame {
    let range = first as usize * PAGE_SIZE..(first as usize + 2) * PAGE_SIZE;
    let (old, new) = (&base.bytes.0[range.clone()], &target.bytes.0[range]);
    let deltas: Vec<u8> = old.iter().zip(new).map(|(a, b)| a ^ b).collect();
    let mut crcs: Vec<u32> = new.chunks(PAGE_SIZE).map(crc32fast::hash).collect();
    if let Some(c) = bad_crc {
        crcs[1] = c;
    }
    Frame::XorPageBatch(XorPageBatch {
        pass,
        set: PageSet::Run {
            first: PageIndex(first),
            count: 2,
        },
        crcs,
        deltas: deltas.into(),
    })
}

/// Pass 0 sent everything; the source then changed pages 5 and 6 a little.
fn after_first_pass() -> (Pair, Mem, Mem) {
    let mut rng = Rng(17);
    let mut src = random_mem(64, &mut rng);
    let mut dst = Mem::new(64);
    let mut pair = Pair::new(64, opts(false, 1 << 20), Capabilities::SUPPORTED, &src);
    pair.pass(&[PageRange::new(0, 64)], &src, &mut dst);
    src.page_mut(5)[100] ^= 0xFF;
    src.page_mut(6)[200] ^= 0x0F;
    let mut out = Vec::new();
    pair.src.begin_pass(&[], &[], &mut out).unwrap();
    pair.send_dest(true, &out, &mut dst).unwrap();
    (pair, src, dst)
}

#[test]
fn a_good_handmade_delta_is_applied() {
    let (mut pair, src, mut dst) = after_first_pass();
    let writes = dst.writes;
    let frame = xor_frame(1, 5, &dst, &src, None);
    let bytes = frame.to_bytes().unwrap();
    pair.send_dest(false, &bytes, &mut dst).unwrap();
    assert_eq!(dst.writes, writes + 2);
    assert!(src.bytes == dst.bytes);
}

#[test]
fn delta_with_bad_crc_is_rejected_and_writes_nothing() {
    let (mut pair, src, mut dst) = after_first_pass();
    let before = dst.clone();
    // The first page is fine; the second page's CRC is wrong, so neither
    // may be written.
    let good = crc32fast::hash(&src.bytes.0[6 * PAGE_SIZE..7 * PAGE_SIZE]);
    let frame = xor_frame(1, 5, &dst, &src, Some(good ^ 1));
    let bytes = frame.to_bytes().unwrap();
    let err = pair.send_dest(false, &bytes, &mut dst).unwrap_err();
    match &err {
        DestError::DeltaCrc {
            index, expected, ..
        } => assert_eq!((*index, *expected), (6, good ^ 1)),
        other => panic!("expected a delta crc error, got {other:?}"),
    }
    assert_eq!(err.reason(), ReasonCode::BadCrc);
    assert!(matches!(
        err.abort_frame(),
        Some(Frame::Abort {
            code: ReasonCode::BadCrc,
            ..
        })
    ));
    assert_eq!(dst.writes, before.writes, "nothing written");
    assert!(dst.bytes == before.bytes);
    assert_eq!(pair.dst.state(), DestState::Failed);
}

#[test]
fn delta_for_a_page_never_received_is_a_protocol_error() {
    let mut rng = Rng(23);
    let src = random_mem(64, &mut rng);
    let mut dst = Mem::new(64);
    let mut pair = Pair::new(64, opts(false, 1 << 20), Capabilities::SUPPORTED, &src);
    // Pass 0 sends only pages 0..5; page 6 has no base.
    pair.pass(&[PageRange::new(0, 6)], &src, &mut dst);
    let mut out = Vec::new();
    pair.src.begin_pass(&[], &[], &mut out).unwrap();
    pair.send_dest(true, &out, &mut dst).unwrap();
    let writes = dst.writes;
    let frame = xor_frame(1, 5, &dst, &src, None);
    let err = pair.dst.handle(frame, &mut dst).unwrap_err();
    assert!(
        matches!(err, DestError::DeltaWithoutBase { index: 6 }),
        "{err:?}"
    );
    assert_eq!(err.reason(), ReasonCode::Protocol);
    assert_eq!(dst.writes, writes);
}

#[test]
fn sink_without_read_back_fails_cleanly() {
    /// A sink that keeps the default `read_back`.
    struct WriteOnly(Mem);
    impl PageSink for WriteOnly {
        fn write_page(&mut self, index: PageIndex, data: &[u8; PAGE_SIZE]) -> io::Result<()> {
            self.0.write_page(index, data)
        }
        fn write_zero(&mut self, start: PageIndex, count: u64) -> io::Result<()> {
            self.0.write_zero(start, count)
        }
    }
    let (mut pair, src, dst) = after_first_pass();
    let frame = xor_frame(1, 5, &dst, &src, None);
    let mut sink = WriteOnly(dst);
    let writes = sink.0.writes;
    let err = pair.dst.handle(frame, &mut sink).unwrap_err();
    assert!(matches!(&err, DestError::ReadBack(e) if e.kind() == io::ErrorKind::Unsupported));
    assert_eq!(sink.0.writes, writes);
}
