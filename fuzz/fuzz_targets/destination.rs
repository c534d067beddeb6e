//! Fuzzes the destination's frame handler: raw bytes fed in pieces into a
//! `DestinationSession`. Checks that it never panics and never writes a
//! page outside the layout it negotiated.
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use transport::layout::{PageIndex, PAGE_SIZE};
use transport::session::{DestOptions, DestinationSession, PageSink};

/// Records page ranges written, and keeps only the pages written with data
/// (the layout in a fuzzed hello can claim up to 1 TiB, but an input can
/// only carry so many pages), so deltas read back the right base.
#[derive(Default)]
struct Recorder(Vec<(u64, u64)>, HashMap<u64, Box<[u8; PAGE_SIZE]>>);

impl PageSink for Recorder {
    fn write_page(&mut self, index: PageIndex, data: &[u8; PAGE_SIZE]) -> std::io::Result<()> {
        self.0.push((index.0, 1));
        self.1.insert(index.0, Box::new(*data));
        Ok(())
    }
    fn write_zero(&mut self, start: PageIndex, count: u64) -> std::io::Result<()> {
        self.0.push((start.0, count));
        let end = start.0.saturating_add(count);
        self.1.retain(|i, _| !(start.0..end).contains(i));
        Ok(())
    }
    fn write_pages(&mut self, first: PageIndex, data: &[u8]) -> std::io::Result<()> {
        assert_eq!(data.len() % PAGE_SIZE, 0);
        self.0.push((first.0, (data.len() / PAGE_SIZE) as u64));
        for (i, page) in data.chunks_exact(PAGE_SIZE).enumerate() {
            let page: &[u8; PAGE_SIZE] = page.try_into().unwrap();
            self.1.insert(first.0 + i as u64, Box::new(*page));
        }
        Ok(())
    }
    fn read_back(&self, index: PageIndex, out: &mut [u8; PAGE_SIZE]) -> std::io::Result<()> {
        match self.1.get(&index.0) {
            Some(page) => out.copy_from_slice(&page[..]),
            None => out.fill(0),
        }
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
