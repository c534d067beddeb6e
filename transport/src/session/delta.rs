//! XOR delta encoding of dirty pages (`XorPageBatch`, capability
//! `XOR_DELTA`), after QEMU's XBZRLE idea: a page dirtied by a few stores
//! differs from the version sent in an earlier pass in a few bytes, so
//! `new ^ old` is almost all zeros and compresses to a tiny fraction of the
//! page.
//!
//! * The source keeps the last-sent version of pages in a bounded
//!   [`DeltaCache`] and encodes a batch's cached pages as one delta frame
//!   when that is smaller than sending them raw or zstd-compressed.
//! * The destination needs no cache: its memory holds exactly what the
//!   source sent before. It reads the current page back from the sink,
//!   XORs, checks the page's CRC32 from the frame, and only when every page
//!   of the frame checks out writes them all. [`ReceivedPages`] tracks
//!   which pages it got with data, because a delta against a page it never
//!   received would reconstruct garbage.

use std::time::Instant;

use super::{DestError, PageSink, PassStats, SourceError};
use crate::codec::encode::put_xor_batch;
use crate::codec::{Encoder, FrameType, PageSet, XorPageBatch, HEADER_LEN};
use crate::layout::{PageIndex, PageRange, PAGE_SIZE};

/// Which CPU-costly encodings the source uses for the next page frames.
/// Both only take effect where the peer agreed on the capability.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Compression {
    /// zstd-compress page batches (`ZSTD`).
    pub zstd: bool,
    /// Send cached dirty pages as XOR deltas (`XOR_DELTA`).
    pub delta: bool,
}

/// Tag of an empty cache slot (no page index reaches it: layouts hold at
/// most 2^28 pages).
const EMPTY: u64 = u64::MAX;

/// The last-sent version of up to `slots` pages, direct-mapped by page index
/// (slot = index mod slots). Lookup and insert are O(1) with no metadata to
/// maintain; a working set of consecutive pages that fits never conflicts
/// with itself, which is the common dirtying pattern.
pub(super) struct DeltaCache {
    tags: Vec<u64>,
    /// `tags.len()` pages. Allocated zeroed, so the kernel maps memory only
    /// for slots that get used.
    data: Vec<u8>,
}

impl std::fmt::Debug for DeltaCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeltaCache")
            .field("slots", &self.tags.len())
            .finish()
    }
}

impl DeltaCache {
    /// A cache of `bytes` (rounded down to pages, at most one slot per guest
    /// page), or `None` when that is not even one page.
    pub(super) fn new(bytes: u64, total_pages: u64) -> Option<Self> {
        let slots = (bytes / PAGE_SIZE as u64).min(total_pages);
        let slots = usize::try_from(slots).ok().filter(|&s| s > 0)?;
        Some(Self {
            tags: vec![EMPTY; slots],
            data: vec![0; slots * PAGE_SIZE],
        })
    }

    fn slot(&self, index: u64) -> usize {
        // `tags` is non-empty and the remainder is below its length.
        (index % self.tags.len() as u64) as usize
    }

    fn get(&self, index: u64) -> Option<&[u8]> {
        let s = self.slot(index);
        (self.tags[s] == index).then(|| &self.data[s * PAGE_SIZE..][..PAGE_SIZE])
    }

    fn insert(&mut self, index: u64, page: &[u8]) {
        let s = self.slot(index);
        self.tags[s] = index;
        self.data[s * PAGE_SIZE..][..PAGE_SIZE].copy_from_slice(page);
    }

    /// Forgets pages of `range` (sent as zero: the cached data is stale).
    pub(super) fn invalidate(&mut self, range: PageRange) {
        let slots = self.tags.len() as u64;
        if range.count >= slots {
            let end = range.start.0.saturating_add(range.count);
            for tag in &mut self.tags {
                if (range.start.0..end).contains(tag) {
                    *tag = EMPTY;
                }
            }
        } else {
            for index in range.start.0..range.start.0 + range.count {
                let s = self.slot(index);
                if self.tags[s] == index {
                    self.tags[s] = EMPTY;
                }
            }
        }
    }
}

/// The source's delta state: the cache and scratch buffers reused between
/// batches.
#[derive(Debug)]
pub(super) struct DeltaEncoder {
    pub(super) cache: DeltaCache,
    compressor: Compressor,
    hit_index: Vec<u64>,
    hit_pages: Vec<u8>,
    xor: Vec<u8>,
    crcs: Vec<u32>,
    miss_index: Vec<u64>,
    miss_pages: Vec<u8>,
    zbuf: Vec<u8>,
}

/// A zstd context for deltas, separate from the batch encoder's so that
/// deltas work with raw zstd switched off.
struct Compressor(zstd::bulk::Compressor<'static>);

impl std::fmt::Debug for Compressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Compressor")
    }
}

/// Compressed deltas at most this fraction of the raw pages are taken
/// without trying zstd on the raw pages: raw zstd would have to shrink
/// ordinary guest data more than 4x to compete, which it rarely does, and
/// trying costs a second compression of the batch.
const CLEAR_WIN_DIVISOR: usize = 4;

impl DeltaEncoder {
    pub(super) fn new(cache: DeltaCache, zstd_level: i32) -> Result<Self, SourceError> {
        let compressor = zstd::bulk::Compressor::new(zstd_level)
            .map_err(|e| SourceError::Encode(crate::codec::EncodeError::Compress(e)))?;
        Ok(Self {
            cache,
            compressor: Compressor(compressor),
            hit_index: Vec::new(),
            hit_pages: Vec::new(),
            xor: Vec::new(),
            crcs: Vec::new(),
            miss_index: Vec::new(),
            miss_pages: Vec::new(),
            zbuf: Vec::new(),
        })
    }

    /// Appends the frame(s) for the non-zero pages `set` with contents
    /// `data`: with `use_delta`, the pages found in the cache as one
    /// `XorPageBatch` (if that is the smallest encoding) followed by the
    /// other pages as a normal batch; otherwise one normal batch. Every page
    /// ends up in the cache as sent. Returns the type of the first frame;
    /// counts frames, compression and deltas in `stats` (not `pages`).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn encode_batch(
        &mut self,
        pass: u32,
        set: &PageSet,
        data: &[u8],
        use_delta: bool,
        encoder: &mut Encoder,
        out: &mut Vec<u8>,
        stats: &mut PassStats,
    ) -> Result<FrameType, SourceError> {
        let started = Instant::now();
        let r = self.encode_inner(pass, set, data, use_delta, encoder, out, stats);
        if r.is_ok() {
            for (index, page) in set.iter().zip(data.chunks_exact(PAGE_SIZE)) {
                self.cache.insert(index.0, page);
            }
        }
        stats.encode_nanos += u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        r
    }

    #[allow(clippy::too_many_arguments)]
    fn encode_inner(
        &mut self,
        pass: u32,
        set: &PageSet,
        data: &[u8],
        use_delta: bool,
        encoder: &mut Encoder,
        out: &mut Vec<u8>,
        stats: &mut PassStats,
    ) -> Result<FrameType, SourceError> {
        if !use_delta {
            return normal(pass, set, data, encoder, out, stats);
        }
        if !set.iter().any(|index| self.cache.get(index.0).is_some()) {
            // No page to delta against (a first pass): the batch goes as
            // it is, without sorting copies.
            stats.delta_cache_misses += set.len() as u64;
            return normal(pass, set, data, encoder, out, stats);
        }
        self.split(set, data);
        stats.delta_cache_misses += self.miss_index.len() as u64;
        let hits = page_set(&self.hit_index);
        let raw = self.xor.len();
        self.zbuf.clear();
        self.zbuf
            .reserve(zstd::zstd_safe::compress_bound(self.xor.len()));
        let zlen = self
            .compressor
            .0
            .compress_to_buffer(&self.xor, &mut self.zbuf)
            .map_err(|e| SourceError::Encode(crate::codec::EncodeError::Compress(e)))?;
        // The decoder only accepts deltas smaller than the pages.
        if zlen >= raw {
            stats.delta_rejected += self.hit_index.len() as u64;
            return normal(pass, set, data, encoder, out, stats);
        }
        let offsets_len = if matches!(hits, PageSet::List { .. }) {
            4 * hits.len()
        } else {
            0
        };
        let delta_len = HEADER_LEN + 16 + 4 * hits.len() + 4 + zlen + offsets_len;
        let first_at = out.len();
        let mut first = FrameType::XorPageBatch;
        if zlen * CLEAR_WIN_DIVISOR > raw || !encoder.compresses() {
            // Not a clear win: encode the cached pages normally and keep
            // whichever frame is smaller.
            let ty = encoder.encode_batch(pass, &hits, &self.hit_pages, out)?;
            if out.len() - first_at <= delta_len {
                stats.delta_rejected += self.hit_index.len() as u64;
                count_normal(ty, raw, out.len() - first_at, stats);
                first = ty;
            } else {
                out.truncate(first_at);
            }
        }
        if first == FrameType::XorPageBatch {
            put_xor_batch(out, pass, &hits, &self.crcs, &self.zbuf[..zlen]);
            stats.batches += 1;
            stats.delta_pages += self.hit_index.len() as u64;
            stats.delta_in += raw as u64;
            stats.delta_wire_bytes += (out.len() - first_at) as u64;
        }
        if !self.miss_index.is_empty() {
            let misses = page_set(&self.miss_index);
            normal(pass, &misses, &self.miss_pages, encoder, out, stats)?;
        }
        Ok(first)
    }

    /// Sorts the pages into cache hits (new page, delta and CRC kept) and
    /// misses (page kept).
    fn split(&mut self, set: &PageSet, data: &[u8]) {
        self.hit_index.clear();
        self.hit_pages.clear();
        self.xor.clear();
        self.crcs.clear();
        self.miss_index.clear();
        self.miss_pages.clear();
        for (index, page) in set.iter().zip(data.chunks_exact(PAGE_SIZE)) {
            match self.cache.get(index.0) {
                Some(old) => {
                    self.hit_index.push(index.0);
                    self.hit_pages.extend_from_slice(page);
                    self.crcs.push(crc32fast::hash(page));
                    let at = self.xor.len();
                    self.xor.resize(at + PAGE_SIZE, 0);
                    for (d, (n, o)) in self.xor[at..].iter_mut().zip(page.iter().zip(old)) {
                        *d = n ^ o;
                    }
                }
                None => {
                    self.miss_index.push(index.0);
                    self.miss_pages.extend_from_slice(page);
                }
            }
        }
    }
}

/// A raw or zstd batch through the session's encoder.
fn normal(
    pass: u32,
    set: &PageSet,
    data: &[u8],
    encoder: &mut Encoder,
    out: &mut Vec<u8>,
    stats: &mut PassStats,
) -> Result<FrameType, SourceError> {
    let start = out.len();
    let ty = encoder.encode_batch(pass, set, data, out)?;
    count_normal(ty, data.len(), out.len() - start, stats);
    Ok(ty)
}

fn count_normal(ty: FrameType, raw: usize, wire: usize, stats: &mut PassStats) {
    stats.batches += 1;
    if ty == FrameType::CompressedPageBatch {
        stats.compressed_batches += 1;
        stats.compressed_in += raw as u64;
        stats.compressed_out += wire as u64;
    }
}

/// The set for sorted, distinct page indexes (at most a batch's worth, so
/// offsets fit in u32).
fn page_set(indexes: &[u64]) -> PageSet {
    let first = indexes[0];
    let span = indexes[indexes.len() - 1] - first + 1;
    if span == indexes.len() as u64 {
        PageSet::Run {
            first: PageIndex(first),
            count: indexes.len() as u32,
        }
    } else {
        PageSet::List {
            first: PageIndex(first),
            offsets: indexes.iter().map(|&i| (i - first) as u32).collect(),
        }
    }
}

/// Pages the destination received with data (raw, compressed or delta):
/// the only pages a delta may be applied to. One bit per page of the
/// layout (32 MiB for the 1 TiB maximum).
#[derive(Debug)]
pub(super) struct ReceivedPages(Vec<u64>);

impl ReceivedPages {
    pub(super) fn new(total_pages: u64) -> Self {
        Self(vec![0; total_pages.div_ceil(64) as usize])
    }

    /// Marks the pages of a validated set (inside the layout).
    pub(super) fn mark(&mut self, set: &PageSet) {
        for index in set.iter() {
            if let Some(w) = self.0.get_mut((index.0 / 64) as usize) {
                *w |= 1 << (index.0 % 64);
            }
        }
    }

    fn contains(&self, index: u64) -> bool {
        self.0
            .get((index / 64) as usize)
            .is_some_and(|w| w & (1 << (index % 64)) != 0)
    }
}

/// Rebuilds the pages of a validated delta frame into `out` (the set's
/// pages in order) from what `sink` holds now. Writes nothing.
pub(super) fn reconstruct<S: PageSink + ?Sized>(
    b: &XorPageBatch,
    received: &ReceivedPages,
    sink: &S,
    out: &mut Vec<u8>,
) -> Result<(), DestError> {
    out.clear();
    out.resize(b.set.len() * PAGE_SIZE, 0);
    let pages = out.chunks_exact_mut(PAGE_SIZE);
    let deltas = b.deltas.chunks_exact(PAGE_SIZE);
    for (((index, page), delta), &crc) in b.set.iter().zip(pages).zip(deltas).zip(&b.crcs) {
        if !received.contains(index.0) {
            return Err(DestError::DeltaWithoutBase { index: index.0 });
        }
        let page: &mut [u8; PAGE_SIZE] = page.try_into().map_err(|_| DestError::DataLength {
            len: b.deltas.len(),
            pages: b.set.len(),
        })?;
        sink.read_back(index, page).map_err(DestError::ReadBack)?;
        for (p, d) in page.iter_mut().zip(delta) {
            *p ^= d;
        }
        let actual = crc32fast::hash(page);
        if actual != crc {
            return Err(DestError::DeltaCrc {
                index: index.0,
                expected: crc,
                actual,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_is_direct_mapped_and_invalidates_ranges() {
        let mut c = DeltaCache::new(4 * PAGE_SIZE as u64, 100).unwrap();
        let page = |b: u8| vec![b; PAGE_SIZE];
        c.insert(1, &page(1));
        c.insert(2, &page(2));
        assert_eq!(c.get(1), Some(&page(1)[..]));
        // 5 maps onto 1's slot and evicts it.
        c.insert(5, &page(5));
        assert_eq!(c.get(1), None);
        assert_eq!(c.get(5), Some(&page(5)[..]));
        c.invalidate(PageRange::new(4, 2));
        assert_eq!(c.get(5), None);
        assert_eq!(c.get(2), Some(&page(2)[..]));
        c.insert(7, &page(7));
        c.invalidate(PageRange::new(0, 1000));
        assert_eq!(c.get(2), None);
        assert_eq!(c.get(7), None);
        assert!(DeltaCache::new(PAGE_SIZE as u64 - 1, 100).is_none());
        assert_eq!(DeltaCache::new(1 << 30, 3).unwrap().tags.len(), 3);
    }

    #[test]
    fn page_sets_from_indexes() {
        assert_eq!(
            page_set(&[4, 5, 6]),
            PageSet::Run {
                first: PageIndex(4),
                count: 3
            }
        );
        assert_eq!(
            page_set(&[4, 6]),
            PageSet::List {
                first: PageIndex(4),
                offsets: vec![0, 2]
            }
        );
    }

    #[test]
    fn received_pages_bits() {
        let mut r = ReceivedPages::new(130);
        r.mark(&PageSet::List {
            first: PageIndex(63),
            offsets: vec![0, 1, 66],
        });
        assert!(r.contains(63) && r.contains(64) && r.contains(129));
        assert!(!r.contains(65) && !r.contains(0) && !r.contains(1 << 40));
    }
}
