//! Guest memory in a vector, for tests, benches and fuzz targets (cargo
//! feature `test-support`): one [`PageSource`] and [`PageSink`] that every
//! in-memory migration uses, instead of a copy per test file.

use std::ops::Range;

use crate::layout::{PageIndex, PageRange, PAGE_SIZE};
use crate::session::{PageSink, PageSource};

/// Guest memory in a vector: `.0` holds page `i` at byte `i * PAGE_SIZE`.
///
/// Two options, both off by default:
///
/// * [`repeating`](Self::repeating): the vector holds fewer pages than the
///   layout, and page `i` lives at page `i % n` of it. Benches move GiBs
///   through a buffer that stays small; a fuzzed hello can claim a 1 TiB
///   layout. Without it, a page beyond the vector panics (a test bug or a
///   session writing outside its layout).
/// * [`taking_bytes`](Self::taking_bytes): the sink takes byte ranges
///   ([`PageSink::writes_bytes`]) like a mapped memfd; without it, whole
///   pages only, like post-copy's installer, and a byte write panics.
///
/// Equal when the vectors and the options are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemPages(pub Vec<u8>, Options);

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Options {
    repeat: bool,
    bytes: bool,
}

impl MemPages {
    /// `bytes` (whole pages) as the memory.
    pub fn new(bytes: Vec<u8>) -> Self {
        Self::with(bytes, Options::default())
    }

    /// `pages` zero pages.
    pub fn zeroed(pages: u64) -> Self {
        Self::new(vec![0; pages as usize * PAGE_SIZE])
    }

    /// `pages` pages of pseudo-random bytes ([`Rng`] from `seed`): no zero
    /// pages, and nothing zstd can shrink.
    pub fn random(pages: u64, seed: u64) -> Self {
        let mut rng = Rng(seed | 1);
        let bytes = (0..pages as usize * PAGE_SIZE)
            .map(|_| rng.next() as u8)
            .collect();
        Self::new(bytes)
    }

    /// `buffer` (whole pages, at least one) repeated over any layout.
    pub fn repeating(buffer: Vec<u8>) -> Self {
        assert!(!buffer.is_empty(), "a repeating memory needs a page");
        let repeat = Options {
            repeat: true,
            ..Options::default()
        };
        Self::with(buffer, repeat)
    }

    /// The same memory, as a sink that takes byte ranges.
    pub fn taking_bytes(mut self) -> Self {
        self.1.bytes = true;
        self
    }

    fn with(bytes: Vec<u8>, options: Options) -> Self {
        assert_eq!(bytes.len() % PAGE_SIZE, 0, "memory of whole pages");
        Self(bytes, options)
    }

    /// Pages the vector holds.
    pub fn pages(&self) -> u64 {
        (self.0.len() / PAGE_SIZE) as u64
    }

    /// Where page `index` lives in the vector.
    pub fn page_offset(&self, index: u64) -> usize {
        self.span(index * PAGE_SIZE as u64, PAGE_SIZE).start
    }

    pub fn page(&self, index: u64) -> &[u8] {
        &self.0[self.span(index * PAGE_SIZE as u64, PAGE_SIZE)]
    }

    pub fn page_mut(&mut self, index: u64) -> &mut [u8] {
        let span = self.span(index * PAGE_SIZE as u64, PAGE_SIZE);
        &mut self.0[span]
    }

    /// The part of the vector that holds memory bytes `at..at + len`, up
    /// to where it wraps or ends (never empty).
    fn span(&self, at: u64, len: usize) -> Range<usize> {
        let size = self.0.len() as u64;
        let start = if self.1.repeat { at % size } else { at };
        assert!(
            start < size,
            "byte {at:#x} is beyond the {size:#x}-byte memory"
        );
        let start = start as usize;
        start..start + len.min(self.0.len() - start)
    }

    /// Applies `f` to the vector's pieces that hold `len` bytes from `at`,
    /// with each piece's offset into those bytes.
    fn for_each_span(&mut self, at: u64, len: usize, mut f: impl FnMut(&mut [u8], usize)) {
        let mut done = 0;
        while done < len {
            let span = self.span(at + done as u64, len - done);
            let n = span.len();
            f(&mut self.0[span], done);
            done += n;
        }
    }

    fn copy_in(&mut self, at: u64, data: &[u8]) {
        self.for_each_span(at, data.len(), |piece, done| {
            piece.copy_from_slice(&data[done..done + piece.len()]);
        });
    }
}

impl PageSource for MemPages {
    fn read_page(&self, index: PageIndex, out: &mut [u8; PAGE_SIZE]) -> std::io::Result<()> {
        out.copy_from_slice(self.page(index.0));
        Ok(())
    }
}

impl PageSink for MemPages {
    fn write_page(&mut self, index: PageIndex, data: &[u8; PAGE_SIZE]) -> std::io::Result<()> {
        self.page_mut(index.0).copy_from_slice(data);
        Ok(())
    }

    fn write_zero(&mut self, start: PageIndex, count: u64) -> std::io::Result<()> {
        let len = count as usize * PAGE_SIZE;
        self.for_each_span(start.0 * PAGE_SIZE as u64, len, |piece, _| piece.fill(0));
        Ok(())
    }

    fn read_back(&self, index: PageIndex, out: &mut [u8; PAGE_SIZE]) -> std::io::Result<()> {
        self.read_page(index, out)
    }

    fn write_pages(&mut self, first: PageIndex, data: &[u8]) -> std::io::Result<()> {
        assert_eq!(data.len() % PAGE_SIZE, 0, "write_pages of whole pages");
        self.copy_in(first.0 * PAGE_SIZE as u64, data);
        Ok(())
    }

    fn writes_bytes(&self) -> bool {
        self.1.bytes
    }

    fn write_bytes(&mut self, at: u64, data: &[u8]) -> std::io::Result<()> {
        assert!(self.1.bytes, "byte write to a sink that takes whole pages");
        assert!(!data.is_empty(), "empty byte write");
        self.copy_in(at, data);
        Ok(())
    }
}

/// Ascending page indexes as ranges of consecutive pages.
pub fn page_runs(pages: impl IntoIterator<Item = u64>) -> Vec<PageRange> {
    let mut out: Vec<PageRange> = Vec::new();
    for p in pages {
        match out.last_mut() {
            Some(r) if r.start.0 + r.count == p => r.count += 1,
            _ => out.push(PageRange::new(p, 1)),
        }
    }
    out
}

/// xorshift64: deterministic test data from a seed, cheap enough to fill
/// GiBs. The state must not be zero (it would stay zero).
#[derive(Clone, Debug)]
pub struct Rng(pub u64);

impl Rng {
    #[allow(clippy::should_implement_trait)] // endless, so not an Iterator
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A value in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page_of(byte: u8) -> [u8; PAGE_SIZE] {
        [byte; PAGE_SIZE]
    }

    #[test]
    fn pages_land_where_they_are_read_back() {
        let mut m = MemPages::zeroed(4);
        m.write_page(PageIndex(2), &page_of(7)).unwrap();
        let mut out = page_of(0);
        m.read_back(PageIndex(2), &mut out).unwrap();
        assert_eq!(out, page_of(7));
        assert!(m.page(1).iter().all(|&b| b == 0));
        m.write_zero(PageIndex(2), 2).unwrap();
        assert!(m.0.iter().all(|&b| b == 0));
    }

    #[test]
    fn repeating_memory_wraps_writes_across_its_end() {
        let mut m = MemPages::repeating(vec![0; 2 * PAGE_SIZE]).taking_bytes();
        // Pages 5 and 6 of the layout are pages 1 and 0 of the buffer.
        let data: Vec<u8> = (0..2 * PAGE_SIZE)
            .map(|i| (i / PAGE_SIZE) as u8 + 1)
            .collect();
        m.write_bytes(5 * PAGE_SIZE as u64, &data).unwrap();
        assert!(m.page(1).iter().all(|&b| b == 1));
        assert!(m.page(6).iter().all(|&b| b == 2));
        assert_eq!(m.page_offset(6), 0);
        m.write_zero(PageIndex(3), 2).unwrap();
        assert!(m.0.iter().all(|&b| b == 0));
    }

    #[test]
    fn page_runs_join_consecutive_pages() {
        let runs = page_runs([1, 2, 3, 7, 9, 10]);
        assert_eq!(
            runs,
            [
                PageRange::new(1, 3),
                PageRange::new(7, 1),
                PageRange::new(9, 2)
            ]
        );
        assert!(page_runs([]).is_empty());
    }

    #[test]
    #[should_panic(expected = "beyond")]
    fn flat_memory_refuses_pages_beyond_it() {
        let mut m = MemPages::zeroed(2);
        let _ = m.write_page(PageIndex(2), &page_of(1));
    }

    #[test]
    #[should_panic(expected = "whole pages")]
    fn whole_page_sink_refuses_byte_writes() {
        let mut m = MemPages::zeroed(1);
        assert!(!m.writes_bytes());
        let _ = m.write_bytes(3, &[1]);
    }
}
