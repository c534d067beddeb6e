//! The set of pages one side of a post-copy migration still has to move:
//! on the destination the pages it lacks, on the source the pages it has not
//! sent since the switchover (or the last resume). A plain bitmap over page
//! indexes: at most 2^28 pages, so at most 32 MiB, and usually far less.

use crate::codec::{Frame, MAX_MISSING_RANGES};
use crate::layout::{PageIndex, PageRange};

/// A set of page indexes below a fixed bound, with a population count.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PageBitmap {
    words: Vec<u64>,
    pages: u64,
    count: u64,
}

impl PageBitmap {
    /// An empty set over pages `0..pages`.
    pub fn new(pages: u64) -> Self {
        Self {
            words: vec![0; pages.div_ceil(64) as usize],
            pages,
            count: 0,
        }
    }

    /// The pages of `ranges`; ranges past `pages` are cut off (callers
    /// check them against the layout first).
    pub fn from_ranges(pages: u64, ranges: &[PageRange]) -> Self {
        let mut set = Self::new(pages);
        for r in ranges {
            set.insert_range(*r);
        }
        set
    }

    /// Upper bound of the index space.
    pub fn capacity(&self) -> u64 {
        self.pages
    }

    /// Pages in the set.
    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn contains(&self, index: PageIndex) -> bool {
        index.0 < self.pages && self.words[(index.0 / 64) as usize] & (1 << (index.0 % 64)) != 0
    }

    /// Adds a page; true if it was not in the set.
    pub fn insert(&mut self, index: PageIndex) -> bool {
        if index.0 >= self.pages {
            return false;
        }
        let (w, bit) = ((index.0 / 64) as usize, 1u64 << (index.0 % 64));
        let new = self.words[w] & bit == 0;
        self.words[w] |= bit;
        self.count += u64::from(new);
        new
    }

    /// Removes a page; true if it was in the set.
    pub fn remove(&mut self, index: PageIndex) -> bool {
        if index.0 >= self.pages {
            return false;
        }
        let (w, bit) = ((index.0 / 64) as usize, 1u64 << (index.0 % 64));
        let had = self.words[w] & bit != 0;
        self.words[w] &= !bit;
        self.count -= u64::from(had);
        had
    }

    pub fn insert_range(&mut self, r: PageRange) {
        let end = r.start.0.saturating_add(r.count).min(self.pages);
        for i in r.start.0..end {
            self.insert(PageIndex(i));
        }
    }

    /// The first page in the set at or after `from`.
    pub fn next_from(&self, from: u64) -> Option<PageIndex> {
        if from >= self.pages {
            return None;
        }
        let mut w = (from / 64) as usize;
        let mut word = self.words[w] & (!0u64 << (from % 64));
        loop {
            if word != 0 {
                return Some(PageIndex(w as u64 * 64 + u64::from(word.trailing_zeros())));
            }
            w += 1;
            word = *self.words.get(w)?;
        }
    }

    /// The set as sorted, maximal runs.
    pub fn ranges(&self) -> Vec<PageRange> {
        let mut out: Vec<PageRange> = Vec::new();
        let mut at = 0;
        while let Some(start) = self.next_from(at) {
            let mut end = start.0 + 1;
            while self.contains(PageIndex(end)) {
                end += 1;
            }
            out.push(PageRange::new(start.0, end - start.0));
            at = end;
        }
        out
    }

    /// The set as `MissingPages` frames of at most [`MAX_MISSING_RANGES`]
    /// ranges each, the last one flagged (one empty frame for an empty set).
    pub fn to_frames(&self) -> Vec<Frame> {
        let ranges = self.ranges();
        let mut frames: Vec<Frame> = ranges
            .chunks(MAX_MISSING_RANGES)
            .map(|c| Frame::MissingPages {
                last: false,
                ranges: c.to_vec(),
            })
            .collect();
        match frames.last_mut() {
            Some(Frame::MissingPages { last, .. }) => *last = true,
            _ => frames.push(Frame::MissingPages {
                last: true,
                ranges: Vec::new(),
            }),
        }
        frames
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_round_trip_and_count() {
        let ranges = [
            PageRange::new(0, 3),
            PageRange::new(63, 2),
            PageRange::new(200, 1),
        ];
        let mut s = PageBitmap::from_ranges(201, &ranges);
        assert_eq!(s.count(), 6);
        assert_eq!(s.ranges(), ranges);
        assert!(s.remove(PageIndex(64)));
        assert!(!s.remove(PageIndex(64)));
        assert_eq!(s.next_from(4), Some(PageIndex(63)));
        assert_eq!(s.next_from(64), Some(PageIndex(200)));
        assert_eq!(s.next_from(201), None);
        assert_eq!(s.count(), 5);
        assert!(!s.insert(PageIndex(500)), "out of bounds is ignored");
    }

    #[test]
    fn frames_are_chunked_and_the_last_is_flagged() {
        let mut s = PageBitmap::new(3 * MAX_MISSING_RANGES as u64);
        for i in (0..s.capacity()).step_by(2) {
            s.insert(PageIndex(i));
        }
        let frames = s.to_frames();
        assert_eq!(frames.len(), 2);
        let mut back = PageBitmap::new(s.capacity());
        for (i, f) in frames.iter().enumerate() {
            let Frame::MissingPages { last, ranges } = f else {
                panic!("{f:?}")
            };
            assert_eq!(*last, i == frames.len() - 1);
            ranges.iter().for_each(|r| back.insert_range(*r));
        }
        assert_eq!(back, s);
        assert_eq!(
            PageBitmap::new(10).to_frames(),
            [Frame::MissingPages {
                last: true,
                ranges: vec![]
            }]
        );
    }
}
