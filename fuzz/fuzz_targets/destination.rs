//! Fuzzes the destination's frame handler: raw bytes fed in pieces into a
//! `DestinationSession`, whose sink takes whole pages or byte ranges (the
//! first byte picks). Checks that it never panics and never writes a
//! page outside the layout it negotiated.
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use transport::layout::{PageIndex, PAGE_SIZE};
use transport::session::{DestOptions, DestinationSession, PageSink};

/// Records page ranges written, and keeps only the pages written with data
/// (the layout in a fuzzed hello can claim up to 1 TiB, but an input can
/// only carry so many pages), so deltas read back the right base. The
/// flag: whether it takes byte ranges (`writes_bytes`), as guest memory
/// does, or only whole pages, as post-copy's installer does.
#[derive(Default)]
struct Recorder(Vec<(u64, u64)>, HashMap<u64, Box<[u8; PAGE_SIZE]>>, bool);

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
    fn writes_bytes(&self) -> bool {
        self.2
    }
    fn write_bytes(&mut self, at: u64, data: &[u8]) -> std::io::Result<()> {
        assert!(self.2, "byte write to a sink that takes whole pages");
        assert!(!data.is_empty());
        let page = PAGE_SIZE as u64;
        let last = at + data.len() as u64 - 1;
        self.0.push((at / page, last / page - at / page + 1));
        let mut done = 0;
        while done < data.len() {
            let pos = at + done as u64;
            let offset = (pos % page) as usize;
            let n = (PAGE_SIZE - offset).min(data.len() - done);
            let stored = self
                .1
                .entry(pos / page)
                .or_insert_with(|| Box::new([0; PAGE_SIZE]));
            stored[offset..offset + n].copy_from_slice(&data[done..done + n]);
            done += n;
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
    // Low 7 bits: the piece size; top bit: a sink that takes byte ranges.
    let chunk = usize::from(split & 0x7f).max(1) * 7;
    let mut dest = DestinationSession::new(DestOptions {
        auto_accept: true,
        ..DestOptions::default()
    });
    let mut sink = Recorder {
        2: split & 0x80 != 0,
        ..Recorder::default()
    };
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
