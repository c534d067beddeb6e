//! The guest memory layout that both peers agree on in the hello.
//!
//! A guest's RAM is a list of regions of guest-physical page frames (on x86
//! the RAM below the MMIO hole at 3 GiB and the rest from 4 GiB). The guest's
//! memfd holds the regions packed one after another, so a page has two names:
//! its [`Pfn`] (guest-physical frame number) and its dense [`PageIndex`]
//! (offset in the memfd / 4096, `0..total_pages`). The wire addresses pages
//! only by [`PageIndex`]; this module converts between the two and checks
//! ranges a peer sends against the negotiated layout.

use std::fmt;

/// Size of a guest page in bytes; the protocol only knows 4 KiB pages.
pub const PAGE_SIZE: usize = 4096;

/// Upper bound on guest RAM a peer may announce: 1 TiB, in pages.
pub const MAX_GUEST_PAGES: u64 = (1 << 40) / PAGE_SIZE as u64;

/// Upper bound on the number of regions in a layout (checked before decoding
/// the region list, so a hello cannot make us allocate much).
pub const MAX_REGIONS: usize = 64;

/// A guest-physical page frame number (guest-physical address / 4096).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pfn(pub u64);

/// A page's dense index: its offset in the guest memfd divided by 4096.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PageIndex(pub u64);

impl fmt::Display for PageIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A contiguous run of dense page indexes, `start..start + count`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageRange {
    pub start: PageIndex,
    pub count: u64,
}

impl PageRange {
    pub fn new(start: u64, count: u64) -> Self {
        Self {
            start: PageIndex(start),
            count,
        }
    }

    /// One past the last index, or `None` if that overflows `u64`.
    pub fn end(&self) -> Option<u64> {
        self.start.0.checked_add(self.count)
    }
}

/// One region of guest RAM: `pages` frames starting at `first_pfn`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    pub first_pfn: Pfn,
    pub pages: u64,
}

/// Why a layout (usually one received from a peer) was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    #[error("layout has no regions")]
    Empty,
    #[error("layout has {count} regions, more than {max}")]
    TooManyRegions { count: usize, max: usize },
    #[error("region {region} is empty")]
    EmptyRegion { region: usize },
    #[error("region {region} ends past the 64-bit pfn space")]
    RegionOverflow { region: usize },
    #[error("region {region} overlaps or precedes the region before it")]
    Unsorted { region: usize },
    #[error("layout holds {pages} pages, more than {max}")]
    TooLarge { pages: u64, max: u64 },
}

/// A page range outside the negotiated layout: `index` is the first bad one.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone, Copy)]
#[error("page index {index} outside the {total_pages}-page layout")]
pub struct OutOfRange {
    pub index: u64,
    pub total_pages: u64,
}

/// A validated guest memory layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryLayout {
    regions: Vec<Region>,
    /// `starts[i]` is the dense index of region `i`'s first page.
    starts: Vec<u64>,
    total_pages: u64,
}

impl MemoryLayout {
    /// Validates `regions`: non-empty, at most [`MAX_REGIONS`], each non-empty,
    /// sorted by pfn without overlap, at most [`MAX_GUEST_PAGES`] in total.
    pub fn new(regions: Vec<Region>) -> Result<Self, LayoutError> {
        if regions.is_empty() {
            return Err(LayoutError::Empty);
        }
        if regions.len() > MAX_REGIONS {
            return Err(LayoutError::TooManyRegions {
                count: regions.len(),
                max: MAX_REGIONS,
            });
        }
        let mut starts = Vec::with_capacity(regions.len());
        let mut total: u64 = 0;
        let mut prev_end: Option<u64> = None;
        for (i, r) in regions.iter().enumerate() {
            if r.pages == 0 {
                return Err(LayoutError::EmptyRegion { region: i });
            }
            let end = r
                .first_pfn
                .0
                .checked_add(r.pages)
                .ok_or(LayoutError::RegionOverflow { region: i })?;
            if prev_end.is_some_and(|p| r.first_pfn.0 < p) {
                return Err(LayoutError::Unsorted { region: i });
            }
            prev_end = Some(end);
            starts.push(total);
            // Saturating keeps the sum meaningful for the error below even
            // when a hostile peer sends regions summing past u64.
            total = total.saturating_add(r.pages);
            if total > MAX_GUEST_PAGES {
                return Err(LayoutError::TooLarge {
                    pages: total,
                    max: MAX_GUEST_PAGES,
                });
            }
        }
        Ok(Self {
            regions,
            starts,
            total_pages: total,
        })
    }

    /// The usual x86 layout for `ram_bytes` of RAM (rounded down to whole
    /// pages): up to 3 GiB from pfn 0, the rest from 4 GiB.
    pub fn x86(ram_bytes: u64) -> Result<Self, LayoutError> {
        const HOLE_START: u64 = (3 << 30) / PAGE_SIZE as u64;
        const HIGH_START: u64 = (4 << 30) / PAGE_SIZE as u64;
        let pages = ram_bytes / PAGE_SIZE as u64;
        let low = pages.min(HOLE_START);
        let mut regions = vec![Region {
            first_pfn: Pfn(0),
            pages: low,
        }];
        if pages > low {
            regions.push(Region {
                first_pfn: Pfn(HIGH_START),
                pages: pages - low,
            });
        }
        Self::new(regions)
    }

    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// Number of pages in the guest, which is also the memfd size / 4096.
    pub fn total_pages(&self) -> u64 {
        self.total_pages
    }

    /// Size of the guest memfd in bytes.
    pub fn total_bytes(&self) -> u64 {
        self.total_pages * PAGE_SIZE as u64
    }

    /// The pfn of a dense index, or `None` past the end.
    pub fn pfn_of(&self, index: PageIndex) -> Option<Pfn> {
        if index.0 >= self.total_pages {
            return None;
        }
        // `starts` is sorted and starts[0] == 0, so the partition point is >= 1.
        let i = self.starts.partition_point(|&s| s <= index.0) - 1;
        Some(Pfn(self.regions[i].first_pfn.0 + (index.0 - self.starts[i])))
    }

    /// The dense index of a pfn, or `None` if the pfn is not guest RAM.
    pub fn index_of(&self, pfn: Pfn) -> Option<PageIndex> {
        let i = self
            .regions
            .partition_point(|r| r.first_pfn.0 <= pfn.0)
            .checked_sub(1)?;
        let r = &self.regions[i];
        let off = pfn.0 - r.first_pfn.0;
        (off < r.pages).then(|| PageIndex(self.starts[i] + off))
    }

    /// Checks that `start..start + count` lies inside the layout.
    pub fn check_range(&self, start: PageIndex, count: u64) -> Result<(), OutOfRange> {
        let err = |index| OutOfRange {
            index,
            total_pages: self.total_pages,
        };
        if start.0 >= self.total_pages {
            return Err(err(start.0));
        }
        match start.0.checked_add(count) {
            Some(end) if end <= self.total_pages => Ok(()),
            _ => Err(err(self.total_pages)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(first: u64, pages: u64) -> Region {
        Region {
            first_pfn: Pfn(first),
            pages,
        }
    }

    #[test]
    fn x86_layout_splits_at_the_hole() {
        let l = MemoryLayout::x86(5 << 30).unwrap();
        assert_eq!(l.regions().len(), 2);
        assert_eq!(l.total_pages(), (5 << 30) / 4096);
        let low = (3u64 << 30) / 4096;
        assert_eq!(l.pfn_of(PageIndex(low - 1)), Some(Pfn(low - 1)));
        assert_eq!(l.pfn_of(PageIndex(low)), Some(Pfn((4 << 30) / 4096)));
        assert_eq!(l.index_of(Pfn(low)), None, "hole is not RAM");
        assert_eq!(
            l.index_of(Pfn((4 << 30) / 4096 + 3)),
            Some(PageIndex(low + 3))
        );
        assert_eq!(l.pfn_of(PageIndex(l.total_pages())), None);
        let small = MemoryLayout::x86(1 << 20).unwrap();
        assert_eq!(small.regions(), &[r(0, 256)]);
    }

    #[test]
    fn index_and_pfn_are_inverse() {
        let l = MemoryLayout::new(vec![r(10, 5), r(100, 3), r(200, 7)]).unwrap();
        for i in 0..l.total_pages() {
            let pfn = l.pfn_of(PageIndex(i)).unwrap();
            assert_eq!(l.index_of(pfn), Some(PageIndex(i)));
        }
        assert_eq!(l.index_of(Pfn(9)), None);
        assert_eq!(l.index_of(Pfn(15)), None);
        assert_eq!(l.index_of(Pfn(207)), None);
    }

    #[test]
    fn rejects_bad_layouts() {
        assert_eq!(MemoryLayout::new(vec![]), Err(LayoutError::Empty));
        assert_eq!(
            MemoryLayout::new(vec![r(0, 10), r(5, 10)]),
            Err(LayoutError::Unsorted { region: 1 })
        );
        assert_eq!(
            MemoryLayout::new(vec![r(10, 1), r(0, 1)]),
            Err(LayoutError::Unsorted { region: 1 })
        );
        assert_eq!(
            MemoryLayout::new(vec![r(0, 0)]),
            Err(LayoutError::EmptyRegion { region: 0 })
        );
        assert_eq!(
            MemoryLayout::new(vec![r(u64::MAX, 2)]),
            Err(LayoutError::RegionOverflow { region: 0 })
        );
        assert!(matches!(
            MemoryLayout::new(vec![r(0, MAX_GUEST_PAGES), r(MAX_GUEST_PAGES, 1)]),
            Err(LayoutError::TooLarge { .. })
        ));
        let many = (0..=MAX_REGIONS as u64).map(|i| r(i * 2, 1)).collect();
        assert!(matches!(
            MemoryLayout::new(many),
            Err(LayoutError::TooManyRegions { .. })
        ));
        // Adjacent regions are fine.
        assert!(MemoryLayout::new(vec![r(0, 10), r(10, 10)]).is_ok());
    }

    #[test]
    fn check_range_bounds() {
        let l = MemoryLayout::new(vec![r(0, 10)]).unwrap();
        assert!(l.check_range(PageIndex(0), 10).is_ok());
        assert!(l.check_range(PageIndex(9), 1).is_ok());
        assert_eq!(l.check_range(PageIndex(10), 0).unwrap_err().index, 10);
        assert_eq!(l.check_range(PageIndex(5), 6).unwrap_err().index, 10);
        assert!(l.check_range(PageIndex(5), u64::MAX).is_err());
    }
}
