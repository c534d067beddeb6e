//! Fuzzes the destination's frame handler: raw bytes fed in pieces into a
//! `DestinationSession`, whose sink takes whole pages or byte ranges (the
//! first byte picks). Checks that it never panics and never writes a
//! page outside the layout it negotiated.
#![no_main]

use libfuzzer_sys::fuzz_target;
use transport::layout::{PageIndex, PAGE_SIZE};
use transport::session::{DestOptions, DestinationSession, PageSink};
use transport::testing::MemPages;

/// Guest memory for the session, recording the page range of every write.
/// A buffer repeated over the layout: a fuzzed hello can claim up to 1 TiB,
/// but an input carries few pages, which rarely share a slot of the buffer,
/// so deltas mostly read back the right base. It takes byte ranges
/// (`writes_bytes`), as guest memory does, or only whole pages, as
/// post-copy's installer does.
struct Recorder {
    mem: MemPages,
    /// (first page, pages) of each write, in order.
    writes: Vec<(u64, u64)>,
}

/// Pages in the repeated buffer (1 MiB).
const BUFFER_PAGES: usize = 256;

impl PageSink for Recorder {
    fn write_page(&mut self, index: PageIndex, data: &[u8; PAGE_SIZE]) -> std::io::Result<()> {
        self.writes.push((index.0, 1));
        self.mem.write_page(index, data)
    }
    fn write_zero(&mut self, start: PageIndex, count: u64) -> std::io::Result<()> {
        self.writes.push((start.0, count));
        // A huge zero run would only clear the buffer many times over.
        let count = count.min(BUFFER_PAGES as u64);
        self.mem.write_zero(start, count)
    }
    fn write_pages(&mut self, first: PageIndex, data: &[u8]) -> std::io::Result<()> {
        self.writes.push((first.0, (data.len() / PAGE_SIZE) as u64));
        self.mem.write_pages(first, data)
    }
    fn writes_bytes(&self) -> bool {
        self.mem.writes_bytes()
    }
    fn write_bytes(&mut self, at: u64, data: &[u8]) -> std::io::Result<()> {
        // Checks the session's side of the contract (byte writes only when
        // asked for, never empty) before the range is worked out.
        self.mem.write_bytes(at, data)?;
        let page = PAGE_SIZE as u64;
        let last = at + data.len() as u64 - 1;
        self.writes.push((at / page, last / page - at / page + 1));
        Ok(())
    }
    fn read_back(&self, index: PageIndex, out: &mut [u8; PAGE_SIZE]) -> std::io::Result<()> {
        self.mem.read_back(index, out)
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, data)) = data.split_first() else {
        return;
    };
    // Low 7 bits: the piece size; top bit: a sink that takes byte ranges.
    let chunk = usize::from(split & 0x7f).max(1) * 7;
    let mut dest = DestinationSession::new(DestOptions {
        auto_accept: true,
        ..DestOptions::default()
    });
    let mem = MemPages::repeating(vec![0; BUFFER_PAGES * PAGE_SIZE]);
    let mut sink = Recorder {
        mem: if split & 0x80 != 0 {
            mem.taking_bytes()
        } else {
            mem
        },
        writes: Vec::new(),
    };
    for piece in data.chunks(chunk) {
        let before = sink.writes.len();
        let r = dest.feed(piece, &mut sink);
        let total = dest.layout().map_or(0, |l| l.total_pages());
        for &(start, count) in &sink.writes[before..] {
            assert!(count > 0 && start + count <= total, "write outside layout");
        }
        if r.is_err() {
            break;
        }
    }
});
