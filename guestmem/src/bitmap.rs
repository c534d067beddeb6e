//! Dirty-page bitmap over page indexes, in KVM's own layout (bit `i` of u64
//! word `w` is page `w * 64 + i`), so a slot's `KVM_GET_DIRTY_LOG` result can
//! be OR-ed in word by word.
//!
//! Bits at or past `pages` in the last word are kept zero by every method
//! here; readers also mask them, so a caller writing garbage there through
//! [`DirtyBitmap::words_mut`] cannot make pages appear that do not exist.

use thiserror::Error;

const WORD_BITS: u64 = 64;

/// Why a serialised bitmap was refused.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum BitmapError {
    #[error("bitmap for {pages} pages needs {expected} bytes, got {found}")]
    Length {
        pages: u64,
        expected: u64,
        found: u64,
    },
    #[error("bitmap for {pages} pages has bits set past its end")]
    TrailingBits { pages: u64 },
}

/// A maximal run of set pages: `start..start + count`.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct DirtyRange {
    pub start: u64,
    pub count: u64,
}

impl DirtyRange {
    /// One past the last page of the run.
    pub const fn end(&self) -> u64 {
        self.start + self.count
    }
}

/// One bit per page index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyBitmap {
    pages: u64,
    words: Vec<u64>,
}

fn words_for(pages: u64) -> usize {
    usize::try_from(pages.div_ceil(WORD_BITS)).expect("bitmap size exceeds the address space")
}

impl DirtyBitmap {
    /// All clear.
    pub fn new(pages: u64) -> Self {
        DirtyBitmap {
            pages,
            words: vec![0; words_for(pages)],
        }
    }

    /// All set (pass 0 sends everything).
    pub fn full(pages: u64) -> Self {
        let mut b = DirtyBitmap {
            pages,
            words: vec![u64::MAX; words_for(pages)],
        };
        b.mask_tail();
        b
    }

    /// Takes KVM-layout words. `words` is padded with zeros or truncated to
    /// the length `pages` needs, and bits past `pages` are dropped.
    pub fn from_words(pages: u64, mut words: Vec<u64>) -> Self {
        words.resize(words_for(pages), 0);
        let mut b = DirtyBitmap { pages, words };
        b.mask_tail();
        b
    }

    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// For filling from `KVM_GET_DIRTY_LOG` in place. Bits past
    /// [`pages`](Self::pages) must be left zero.
    pub fn words_mut(&mut self) -> &mut [u64] {
        &mut self.words
    }

    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Mask of the valid bits of the last word (all ones if it is full).
    fn tail_mask(&self) -> u64 {
        match self.pages % WORD_BITS {
            0 => u64::MAX,
            r => (1u64 << r) - 1,
        }
    }

    fn mask_tail(&mut self) {
        let mask = self.tail_mask();
        if let Some(last) = self.words.last_mut() {
            *last &= mask;
        }
    }

    /// Word `w` with bits past the end cleared.
    fn word(&self, w: usize) -> u64 {
        let v = self.words[w];
        if w + 1 == self.words.len() {
            v & self.tail_mask()
        } else {
            v
        }
    }

    #[track_caller]
    fn check_index(&self, index: u64) {
        assert!(
            index < self.pages,
            "page index {index} out of range for bitmap of {} pages",
            self.pages
        );
    }

    /// # Panics
    /// If `index >= pages()`; check peer-supplied indexes against the layout first.
    #[track_caller]
    pub fn set(&mut self, index: u64) {
        self.check_index(index);
        self.words[(index / WORD_BITS) as usize] |= 1 << (index % WORD_BITS);
    }

    /// # Panics
    /// If `index >= pages()`.
    #[track_caller]
    pub fn clear(&mut self, index: u64) {
        self.check_index(index);
        self.words[(index / WORD_BITS) as usize] &= !(1 << (index % WORD_BITS));
    }

    /// Whether page `index` is set; `false` past the end.
    pub fn test(&self, index: u64) -> bool {
        index < self.pages
            && self.words[(index / WORD_BITS) as usize] & (1 << (index % WORD_BITS)) != 0
    }

    /// Sets `count` pages from `start`, a word at a time.
    ///
    /// # Panics
    /// If the range reaches past `pages()`.
    #[track_caller]
    pub fn set_range(&mut self, start: u64, count: u64) {
        let end = start.checked_add(count);
        assert!(
            end.is_some_and(|e| e <= self.pages),
            "page range {start}+{count} out of range for bitmap of {} pages",
            self.pages
        );
        let end = start + count;
        let mut i = start;
        while i < end {
            let bit = i % WORD_BITS;
            let n = (WORD_BITS - bit).min(end - i);
            let mask = if n == WORD_BITS {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << bit
            };
            self.words[(i / WORD_BITS) as usize] |= mask;
            i += n;
        }
    }

    /// Number of set pages.
    pub fn count(&self) -> u64 {
        (0..self.words.len())
            .map(|w| u64::from(self.word(w).count_ones()))
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        (0..self.words.len()).all(|w| self.word(w) == 0)
    }

    pub fn clear_all(&mut self) {
        self.words.fill(0);
    }

    /// OR `other` in.
    ///
    /// # Panics
    /// If the two bitmaps cover different numbers of pages.
    #[track_caller]
    pub fn merge(&mut self, other: &DirtyBitmap) {
        assert_eq!(
            self.pages, other.pages,
            "merging bitmaps of different sizes"
        );
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= b;
        }
        self.mask_tail();
    }

    /// OR a slot's KVM bitmap in at page `first_page`. Layout regions are
    /// 2 MiB aligned, so a slot's first page index is a multiple of 64 and
    /// its bitmap covers whole words.
    ///
    /// # Panics
    /// If `first_page` is not a multiple of 64 or `words` reaches past the end.
    #[track_caller]
    pub fn merge_words_at(&mut self, first_page: u64, words: &[u64]) {
        assert!(
            first_page % WORD_BITS == 0,
            "slot bitmap at page {first_page} is not word aligned"
        );
        let first = (first_page / WORD_BITS) as usize;
        assert!(
            first
                .checked_add(words.len())
                .is_some_and(|end| end <= self.words.len()),
            "slot bitmap of {} words at page {first_page} past the end of {} pages",
            words.len(),
            self.pages
        );
        for (a, b) in self.words[first..].iter_mut().zip(words) {
            *a |= b;
        }
        self.mask_tail();
    }

    /// First set page at or after `from`.
    fn next_set(&self, from: u64) -> Option<u64> {
        self.next_matching(from, false)
    }

    /// First clear page at or after `from`, or `pages()` if none.
    fn next_clear(&self, from: u64) -> u64 {
        self.next_matching(from, true).unwrap_or(self.pages)
    }

    /// First page at or after `from` whose bit is `!invert`.
    fn next_matching(&self, from: u64, invert: bool) -> Option<u64> {
        if from >= self.pages {
            return None;
        }
        let mut w = (from / WORD_BITS) as usize;
        // Drop the bits below `from` in the first word.
        let flip = |v: u64| if invert { !v } else { v };
        let mut bits = flip(self.word(w)) & (u64::MAX << (from % WORD_BITS));
        loop {
            if bits != 0 {
                let i = w as u64 * WORD_BITS + u64::from(bits.trailing_zeros());
                // An inverted tail word has "clear" bits past the end.
                return (i < self.pages).then_some(i);
            }
            w += 1;
            if w >= self.words.len() {
                return None;
            }
            bits = flip(self.word(w));
        }
    }

    /// Set page indexes, ascending.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.words.len()).flat_map(move |w| {
            let mut bits = self.word(w);
            std::iter::from_fn(move || {
                if bits == 0 {
                    return None;
                }
                let i = bits.trailing_zeros();
                bits &= bits - 1;
                Some(w as u64 * WORD_BITS + u64::from(i))
            })
        })
    }

    /// Maximal runs of set pages, ascending. Long runs cost one step per
    /// word, not per page.
    pub fn ranges(&self) -> impl Iterator<Item = DirtyRange> + '_ {
        let mut pos = 0;
        std::iter::from_fn(move || {
            let start = self.next_set(pos)?;
            let end = self.next_clear(start);
            pos = end;
            Some(DirtyRange {
                start,
                count: end - start,
            })
        })
    }

    /// Little-endian u64 words, `8 * ceil(pages / 64)` bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        (0..self.words.len())
            .flat_map(|w| self.word(w).to_le_bytes())
            .collect()
    }

    /// Parses [`to_bytes`](Self::to_bytes) output for a bitmap of `pages`
    /// pages. The length must match exactly and no bit past `pages` may be
    /// set, so untrusted input cannot name pages outside the layout.
    pub fn from_bytes(pages: u64, bytes: &[u8]) -> Result<Self, BitmapError> {
        // Computed in u128 so absurd `pages` cannot overflow; the allocation
        // below is bounded by `bytes`, which the caller already holds.
        let expected = u128::from(pages.div_ceil(WORD_BITS)) * 8;
        if expected != bytes.len() as u128 {
            return Err(BitmapError::Length {
                pages,
                expected: u64::try_from(expected).unwrap_or(u64::MAX),
                found: bytes.len() as u64,
            });
        }
        let words: Vec<u64> = bytes
            .chunks_exact(8)
            .map(|c| {
                let mut w = [0u8; 8];
                w.copy_from_slice(c);
                u64::from_le_bytes(w)
            })
            .collect();
        let b = DirtyBitmap { pages, words };
        if b.words
            .last()
            .is_some_and(|last| last & !b.tail_mask() != 0)
        {
            return Err(BitmapError::TrailingBits { pages });
        }
        Ok(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn oracle_ranges(set: &BTreeSet<u64>) -> Vec<DirtyRange> {
        let mut out: Vec<DirtyRange> = Vec::new();
        for &i in set {
            match out.last_mut() {
                Some(r) if r.end() == i => r.count += 1,
                _ => out.push(DirtyRange { start: i, count: 1 }),
            }
        }
        out
    }

    fn from_set(pages: u64, set: &BTreeSet<u64>) -> DirtyBitmap {
        let mut b = DirtyBitmap::new(pages);
        for &i in set {
            b.set(i);
        }
        b
    }

    #[test]
    fn full_and_tail() {
        for pages in [0, 1, 63, 64, 65, 128, 1000] {
            let b = DirtyBitmap::full(pages);
            assert_eq!(b.count(), pages);
            assert_eq!(b.words().len() as u64, pages.div_ceil(64));
            let ranges: Vec<_> = b.ranges().collect();
            if pages == 0 {
                assert!(ranges.is_empty());
                assert!(b.is_empty());
            } else {
                assert_eq!(
                    ranges,
                    vec![DirtyRange {
                        start: 0,
                        count: pages
                    }]
                );
            }
            assert!(!b.test(pages));
        }
    }

    #[test]
    fn garbage_past_end_is_invisible() {
        let mut b = DirtyBitmap::new(70);
        b.words_mut()[1] = u64::MAX;
        assert_eq!(b.count(), 6);
        assert_eq!(b.iter().collect::<Vec<_>>(), (64..70).collect::<Vec<_>>());
        assert_eq!(
            b.ranges().collect::<Vec<_>>(),
            vec![DirtyRange {
                start: 64,
                count: 6
            }]
        );
        assert!(!b.test(70));
        let back = DirtyBitmap::from_bytes(70, &b.to_bytes()).unwrap();
        assert_eq!(back.words()[1], 0b11_1111);

        let b = DirtyBitmap::from_words(70, vec![0, u64::MAX, 5]);
        assert_eq!(b.words(), &[0, 0b11_1111]);
        let b = DirtyBitmap::from_words(200, vec![1]);
        assert_eq!(b.words().len(), 4);
        assert_eq!(b.iter().collect::<Vec<_>>(), vec![0]);
    }

    #[test]
    fn from_bytes_rejects_bad_input() {
        assert_eq!(
            DirtyBitmap::from_bytes(65, &[0; 8]),
            Err(BitmapError::Length {
                pages: 65,
                expected: 16,
                found: 8
            })
        );
        assert!(matches!(
            DirtyBitmap::from_bytes(u64::MAX, &[0; 8]),
            Err(BitmapError::Length { .. })
        ));
        let mut bytes = vec![0u8; 16];
        bytes[8] = 0b10; // page 65 of a 65-page bitmap
        assert_eq!(
            DirtyBitmap::from_bytes(65, &bytes),
            Err(BitmapError::TrailingBits { pages: 65 })
        );
        bytes[8] = 0b1;
        assert!(DirtyBitmap::from_bytes(65, &bytes).unwrap().test(64));
        assert_eq!(DirtyBitmap::from_bytes(0, &[]), Ok(DirtyBitmap::new(0)));
    }

    #[test]
    #[should_panic(expected = "out of range")]
    fn set_past_end_panics() {
        DirtyBitmap::new(10).set(10);
    }

    #[test]
    #[should_panic(expected = "not word aligned")]
    fn merge_words_unaligned_panics() {
        DirtyBitmap::new(128).merge_words_at(32, &[1]);
    }

    #[test]
    #[should_panic(expected = "past the end")]
    fn merge_words_past_end_panics() {
        DirtyBitmap::new(128).merge_words_at(64, &[1, 1]);
    }

    fn arb_bitmap() -> impl Strategy<Value = (u64, BTreeSet<u64>)> {
        (1u64..2000).prop_flat_map(|pages| {
            let dense = prop::collection::btree_set(0..pages, 0..=pages as usize);
            // Runs exercise set_range and word-spanning ranges.
            let runs = prop::collection::vec((0..pages, 0u64..300), 0..6).prop_map(move |runs| {
                runs.into_iter()
                    .flat_map(|(s, n)| s..(s + n).min(pages))
                    .collect::<BTreeSet<u64>>()
            });
            (Just(pages), prop_oneof![dense, runs])
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        #[test]
        fn matches_btreeset_oracle((pages, set) in arb_bitmap()) {
            let b = from_set(pages, &set);
            prop_assert_eq!(b.count(), set.len() as u64);
            prop_assert_eq!(b.is_empty(), set.is_empty());
            prop_assert_eq!(b.iter().collect::<Vec<_>>(), set.iter().copied().collect::<Vec<_>>());
            for i in 0..pages + 2 {
                prop_assert_eq!(b.test(i), set.contains(&i));
            }
            let ranges: Vec<_> = b.ranges().collect();
            prop_assert_eq!(&ranges, &oracle_ranges(&set));

            // ranges -> set_range rebuilds the same bitmap.
            let mut rebuilt = DirtyBitmap::new(pages);
            for r in &ranges {
                rebuilt.set_range(r.start, r.count);
            }
            prop_assert_eq!(&rebuilt, &b);

            // Byte round trip.
            prop_assert_eq!(&DirtyBitmap::from_bytes(pages, &b.to_bytes()).unwrap(), &b);
            prop_assert_eq!(&DirtyBitmap::from_words(pages, b.words().to_vec()), &b);

            // Clearing every set page empties it.
            let mut c = b.clone();
            for &i in &set {
                c.clear(i);
            }
            prop_assert!(c.is_empty());
            let mut c = b.clone();
            c.clear_all();
            prop_assert_eq!(c, DirtyBitmap::new(pages));
        }

        #[test]
        fn merge_is_union((pages, a) in arb_bitmap(), seed in any::<u64>()) {
            // A second set over the same page count.
            let other: BTreeSet<u64> = (0..pages).filter(|i| (i.wrapping_mul(seed) >> 7) % 5 == 0).collect();
            let mut m = from_set(pages, &a);
            m.merge(&from_set(pages, &other));
            let union: BTreeSet<u64> = a.union(&other).copied().collect();
            prop_assert_eq!(m.iter().collect::<Vec<_>>(), union.iter().copied().collect::<Vec<_>>());
            prop_assert_eq!(m.ranges().collect::<Vec<_>>(), oracle_ranges(&union));
        }

        #[test]
        fn merge_words_at_is_shifted_union(
            (pages, base) in arb_bitmap(),
            slot_word in 0u64..32,
            slot_set in prop::collection::btree_set(0u64..512, 0..64),
        ) {
            let words_total = pages.div_ceil(64);
            prop_assume!(words_total > 0);
            let first_word = slot_word % words_total;
            let slot_pages = ((words_total - first_word) * 64).min(512);
            let slot_set: BTreeSet<u64> = slot_set.into_iter().filter(|i| *i < slot_pages).collect();
            let slot = from_set(slot_pages, &slot_set);
            let first_page = first_word * 64;

            let mut b = from_set(pages, &base);
            b.merge_words_at(first_page, slot.words());
            let expect: BTreeSet<u64> = base
                .iter()
                .copied()
                .chain(slot_set.iter().map(|i| i + first_page).filter(|i| *i < pages))
                .collect();
            prop_assert_eq!(b.iter().collect::<Vec<_>>(), expect.into_iter().collect::<Vec<_>>());
        }

        #[test]
        fn set_range_matches_oracle(pages in 1u64..1000, start_frac in 0.0f64..1.0, len in 0u64..400) {
            let start = (pages as f64 * start_frac) as u64;
            let count = len.min(pages - start);
            let mut b = DirtyBitmap::new(pages);
            b.set_range(start, count);
            let set: BTreeSet<u64> = (start..start + count).collect();
            prop_assert_eq!(b, from_set(pages, &set));
        }
    }
}
