//! Fuzzes the destination's frame handler: raw bytes fed in pieces into a
//! `DestinationSession`. Checks that it never panics and never writes a
//! page outside the layout it negotiated.
#![no_main]

use libfuzzer_sys::fuzz_target;
use transport::layout::{PageIndex, PAGE_SIZE};
use transport::session::{DestOptions, DestinationSession, PageSink};

/// Records page ranges written, without storing memory (the layout in a
/// fuzzed hello can claim up to 1 TiB).
#[derive(Default)]
struct Recorder(Vec<(u64, u64)>);

impl PageSink for Recorder {
    fn write_page(&mut self, index: PageIndex, _: &[u8; PAGE_SIZE]) -> std::io::Result<()> {
        self.0.push((index.0, 1));
        Ok(())
    }
    fn write_zero(&mut self, start: PageIndex, count: u64) -> std::io::Result<()> {
        self.0.push((start.0, count));
        Ok(())
    }
    fn write_pages(&mut self, first: PageIndex, data: &[u8]) -> std::io::Result<()> {
        assert_eq!(data.len() % PAGE_SIZE, 0);
        self.0.push((first.0, (data.len() / PAGE_SIZE) as u64));
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, data)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(split).max(1) * 7;
    let mut dest = DestinationSession::new(DestOptions {
        auto_accept: true,
        ..DestOptions::default()
    });
    let mut sink = Recorder::default();
    for piece in data.chunks(chunk) {
        let before = sink.0.len();
        let r = dest.feed(piece, &mut sink);
        let total = dest.layout().map_or(0, |l| l.total_pages());
        for &(start, count) in &sink.0[before..] {
            assert!(count > 0 && start + count <= total, "write outside layout");
        }
        if r.is_err() {
            break;
        }
    }
});
