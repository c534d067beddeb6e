//! Cutting an iteration into transport passes. A pass ends with a round
//! trip, which is where a switch to post-copy or the completion deadline
//! can take effect; chunks keep that within about a second.

use guestmem::DirtyBitmap;
use transport::layout::{PageRange, PAGE_SIZE};

/// Most pages in one transport pass. An iteration over a large dirty set
/// is sent as several passes, so that a switch to post-copy or the
/// completion deadline takes effect within one chunk (64 MiB, or about a
/// second's worth under a bandwidth cap) instead of a whole iteration.
const PASS_CHUNK_PAGES: u64 = 16 * 1024;
/// Fewest pages in a chunk (1 MiB): below that the per-pass round trip
/// would cost more than it saves.
const MIN_CHUNK_PAGES: u64 = 256;

/// Pages per transport pass under a bandwidth cap of `cap` wire bytes per
/// second (0: no cap).
pub(super) fn chunk_pages(cap: u64) -> u64 {
    match cap {
        0 => PASS_CHUNK_PAGES,
        n => (n / PAGE_SIZE as u64).clamp(MIN_CHUNK_PAGES, PASS_CHUNK_PAGES),
    }
}

/// Splits ranges into chunks of at most `max` pages each, in order.
pub(super) fn chunk_ranges(ranges: Vec<PageRange>, max: u64) -> Vec<Vec<PageRange>> {
    let mut out = Vec::new();
    let mut chunk = Vec::new();
    let mut room = max;
    for r in ranges {
        let (mut start, mut count) = (r.start.0, r.count);
        while count > 0 {
            let take = count.min(room);
            chunk.push(PageRange::new(start, take));
            start += take;
            count -= take;
            room -= take;
            if room == 0 {
                out.push(std::mem::take(&mut chunk));
                room = max;
            }
        }
    }
    if !chunk.is_empty() {
        out.push(chunk);
    }
    out
}

/// A dirty bitmap as the transport's page ranges.
pub(super) fn bitmap_ranges(b: &DirtyBitmap) -> Vec<PageRange> {
    b.ranges()
        .map(|r| PageRange::new(r.start, r.count))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_size_follows_the_cap() {
        assert_eq!(chunk_pages(0), PASS_CHUNK_PAGES);
        assert_eq!(chunk_pages(1), MIN_CHUNK_PAGES);
        assert_eq!(chunk_pages(64 << 20), (64 << 20) / 4096);
        assert_eq!(chunk_pages(u64::MAX), PASS_CHUNK_PAGES);
    }

    #[test]
    fn chunks_cover_ranges_in_order() {
        let ranges = vec![
            PageRange::new(0, 5),
            PageRange::new(10, 2),
            PageRange::new(20, 7),
        ];
        let chunks = chunk_ranges(ranges.clone(), 4);
        assert!(chunks
            .iter()
            .all(|c| c.iter().map(|r| r.count).sum::<u64>() <= 4));
        let flat: Vec<u64> = chunks
            .iter()
            .flatten()
            .flat_map(|r| r.start.0..r.start.0 + r.count)
            .collect();
        let want: Vec<u64> = ranges
            .iter()
            .flat_map(|r| r.start.0..r.start.0 + r.count)
            .collect();
        assert_eq!(flat, want);
        assert_eq!(chunks.len(), 4);
        assert!(chunk_ranges(Vec::new(), 4).is_empty());
    }
}
