//! Guest-physical layout of RAM and the three address spaces around it.
//!
//! * `Gpa` / `Pfn`: guest-physical byte address and 4 KiB frame number, as
//!   the guest and KVM see them.
//! * file offset: where that byte lives in the memfd. Regions are packed
//!   back to back in guest-physical order, so offsets are dense.
//! * page index: `file_offset / PAGE_SIZE`, the dense address used by
//!   [`DirtyBitmap`](crate::DirtyBitmap) and on the wire. Because every region
//!   is 2 MiB aligned in gpa, size and file offset, a KVM slot's dirty bitmap
//!   (one bit per page, u64 words) lands on whole words of the dense bitmap.
//!
//! A layout may arrive from a peer (it is `Deserialize`), so deserialising
//! runs the same validation as [`MemoryLayout::from_regions`].

use std::fmt;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Size of a guest page (x86 base page).
pub const PAGE_SIZE: usize = 4096;
/// `PAGE_SIZE` as the u64 that address arithmetic uses.
const PAGE: u64 = PAGE_SIZE as u64;
const PAGE_SHIFT: u32 = 12;

/// Granularity of region sizes, guest-physical starts and file offsets.
/// 2 MiB = 512 pages = 8 bitmap words, and lets the host back RAM with THPs.
pub const REGION_ALIGN: u64 = 2 << 20;

const GIB: u64 = 1 << 30;
/// Start of the 32-bit MMIO hole; RAM above this moves to [`HIGH_RAM_START`].
pub const LOW_RAM_END: u64 = 3 * GIB;
/// Where RAM resumes above the 32-bit MMIO hole.
pub const HIGH_RAM_START: u64 = 4 * GIB;

/// Highest guest-physical address (exclusive) a layout may reach: x86-64's
/// architectural 52-bit physical address limit. It also bounds what a peer
/// can make us `ftruncate`.
pub const MAX_GPA: u64 = 1 << 52;
/// More regions than this is certainly not a layout we produced.
pub const MAX_REGIONS: usize = 64;

/// Guest-physical address.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Gpa(pub u64);

/// Guest page frame number (`gpa >> 12`).
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Pfn(pub u64);

impl Gpa {
    /// The frame containing this address.
    pub const fn pfn(self) -> Pfn {
        Pfn(self.0 >> PAGE_SHIFT)
    }

    /// Byte offset of this address inside its page.
    pub const fn page_offset(self) -> u64 {
        self.0 & (PAGE - 1)
    }

    /// `self + bytes`, or `None` on overflow.
    pub const fn checked_add(self, bytes: u64) -> Option<Gpa> {
        match self.0.checked_add(bytes) {
            Some(v) => Some(Gpa(v)),
            None => None,
        }
    }
}

impl Pfn {
    /// First byte of this frame. Frames at or above 2^52 do not exist on
    /// x86-64; their high bits are shifted out.
    pub const fn gpa(self) -> Gpa {
        Gpa(self.0 << PAGE_SHIFT)
    }
}

impl fmt::Display for Gpa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

impl fmt::Display for Pfn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pfn {:#x}", self.0)
    }
}

/// One contiguous piece of guest RAM: guest-physical start, size, and where
/// it lives in the memfd.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Region {
    pub gpa: Gpa,
    pub size: u64,
    pub file_offset: u64,
}

impl Region {
    /// One past the last guest-physical byte.
    pub const fn gpa_end(&self) -> u64 {
        self.gpa.0 + self.size
    }

    /// One past the last file offset.
    pub const fn file_end(&self) -> u64 {
        self.file_offset + self.size
    }

    /// First page index of the region.
    pub const fn first_index(&self) -> u64 {
        self.file_offset / PAGE
    }

    /// Number of pages in the region.
    pub const fn pages(&self) -> u64 {
        self.size / PAGE
    }

    fn contains_gpa(&self, gpa: Gpa) -> bool {
        gpa.0 >= self.gpa.0 && gpa.0 < self.gpa_end()
    }

    fn contains_offset(&self, offset: u64) -> bool {
        offset >= self.file_offset && offset < self.file_end()
    }
}

/// Why a memory layout was refused.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum LayoutError {
    #[error("memory size {bytes:#x} is not a non-zero multiple of 2 MiB")]
    BadSize { bytes: u64 },
    #[error("memory size {bytes:#x} exceeds the guest-physical address limit")]
    TooLarge { bytes: u64 },
    #[error("layout has no regions")]
    Empty,
    #[error("layout has {count} regions, more than {max}")]
    TooManyRegions { count: usize, max: usize },
    #[error("region {index} (gpa {gpa}, size {size:#x}) is empty or not 2 MiB aligned")]
    Misaligned { index: usize, gpa: Gpa, size: u64 },
    #[error("region {index} (gpa {gpa}, size {size:#x}) ends above the guest-physical limit")]
    BeyondLimit { index: usize, gpa: Gpa, size: u64 },
    #[error("region {index} at gpa {gpa} overlaps or precedes the previous region")]
    Unordered { index: usize, gpa: Gpa },
    #[error(
        "region {index} has file offset {found:#x}, expected {expected:#x} (regions are packed)"
    )]
    NotPacked {
        index: usize,
        expected: u64,
        found: u64,
    },
}

/// RAM below the 32-bit MMIO hole (0..3 GiB) and the rest from 4 GiB,
/// packed back to back in the memfd.
///
/// Invariants (checked by every constructor, including `Deserialize`):
/// 1..=[`MAX_REGIONS`] regions, sorted by gpa and non-overlapping, each
/// non-empty and 2 MiB aligned in gpa and size, ending at or below
/// [`MAX_GPA`], with file offsets packed from 0 in the same order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "UncheckedLayout")]
pub struct MemoryLayout {
    regions: Vec<Region>,
}

/// Wire shape of [`MemoryLayout`] before validation.
#[derive(Deserialize)]
struct UncheckedLayout {
    regions: Vec<Region>,
}

impl TryFrom<UncheckedLayout> for MemoryLayout {
    type Error = LayoutError;

    fn try_from(raw: UncheckedLayout) -> Result<Self, LayoutError> {
        MemoryLayout::from_regions(raw.regions)
    }
}

impl MemoryLayout {
    /// The standard PC layout for `bytes` of RAM: up to 3 GiB at gpa 0, the
    /// remainder from 4 GiB. `bytes` must be a non-zero multiple of 2 MiB.
    pub fn for_size(bytes: u64) -> Result<Self, LayoutError> {
        if bytes == 0 || bytes % REGION_ALIGN != 0 {
            return Err(LayoutError::BadSize { bytes });
        }
        if bytes <= LOW_RAM_END {
            return Self::from_regions(vec![Region {
                gpa: Gpa(0),
                size: bytes,
                file_offset: 0,
            }]);
        }
        let high = bytes - LOW_RAM_END;
        if high > MAX_GPA - HIGH_RAM_START {
            return Err(LayoutError::TooLarge { bytes });
        }
        Self::from_regions(vec![
            Region {
                gpa: Gpa(0),
                size: LOW_RAM_END,
                file_offset: 0,
            },
            Region {
                gpa: Gpa(HIGH_RAM_START),
                size: high,
                file_offset: LOW_RAM_END,
            },
        ])
    }

    /// Validates an explicit list of regions (see the type's invariants).
    pub fn from_regions(regions: Vec<Region>) -> Result<Self, LayoutError> {
        if regions.is_empty() {
            return Err(LayoutError::Empty);
        }
        if regions.len() > MAX_REGIONS {
            return Err(LayoutError::TooManyRegions {
                count: regions.len(),
                max: MAX_REGIONS,
            });
        }
        let mut next_offset = 0u64;
        let mut prev_end = 0u64;
        for (index, r) in regions.iter().enumerate() {
            if r.size == 0 || r.size % REGION_ALIGN != 0 || r.gpa.0 % REGION_ALIGN != 0 {
                return Err(LayoutError::Misaligned {
                    index,
                    gpa: r.gpa,
                    size: r.size,
                });
            }
            // Checked before gpa_end() so that the addition cannot overflow.
            if r.gpa.0 >= MAX_GPA || r.size > MAX_GPA - r.gpa.0 {
                return Err(LayoutError::BeyondLimit {
                    index,
                    gpa: r.gpa,
                    size: r.size,
                });
            }
            if index > 0 && r.gpa.0 < prev_end {
                return Err(LayoutError::Unordered { index, gpa: r.gpa });
            }
            if r.file_offset != next_offset {
                return Err(LayoutError::NotPacked {
                    index,
                    expected: next_offset,
                    found: r.file_offset,
                });
            }
            prev_end = r.gpa_end();
            // Sum of sizes <= sum of disjoint spans below MAX_GPA: no overflow.
            next_offset += r.size;
        }
        Ok(MemoryLayout { regions })
    }

    /// The regions, sorted by gpa (and therefore by file offset).
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// Bytes of RAM, which is also the memfd's size.
    pub fn total_bytes(&self) -> u64 {
        self.regions.last().map_or(0, Region::file_end)
    }

    /// Pages of RAM: the number of page indexes.
    pub fn total_pages(&self) -> u64 {
        self.total_bytes() / PAGE
    }

    /// The region holding guest-physical address `gpa`.
    pub fn region_for_gpa(&self, gpa: Gpa) -> Option<&Region> {
        // Few regions (usually two): a scan beats a binary search.
        self.regions.iter().find(|r| r.contains_gpa(gpa))
    }

    /// The region holding memfd offset `offset`.
    pub fn region_for_offset(&self, offset: u64) -> Option<&Region> {
        self.regions.iter().find(|r| r.contains_offset(offset))
    }

    /// memfd offset of `gpa`, or `None` if no RAM is there.
    pub fn gpa_to_offset(&self, gpa: Gpa) -> Option<u64> {
        self.region_for_gpa(gpa)
            .map(|r| r.file_offset + (gpa.0 - r.gpa.0))
    }

    /// Guest-physical address of memfd offset `offset`, or `None` past the end.
    pub fn offset_to_gpa(&self, offset: u64) -> Option<Gpa> {
        self.region_for_offset(offset)
            .map(|r| Gpa(r.gpa.0 + (offset - r.file_offset)))
    }

    /// Page index of frame `pfn`, or `None` if no RAM is there.
    pub fn pfn_to_index(&self, pfn: Pfn) -> Option<u64> {
        if pfn.0 >= MAX_GPA >> PAGE_SHIFT {
            return None;
        }
        self.gpa_to_offset(pfn.gpa()).map(|o| o / PAGE)
    }

    /// Frame of page index `index`, or `None` past the end.
    pub fn index_to_pfn(&self, index: u64) -> Option<Pfn> {
        let offset = index.checked_mul(PAGE)?;
        self.offset_to_gpa(offset).map(Gpa::pfn)
    }

    /// Whether `count` pages from `index` are all inside the layout.
    pub fn contains_pages(&self, index: u64, count: u64) -> bool {
        index
            .checked_add(count)
            .is_some_and(|end| end <= self.total_pages())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn small_layout_is_one_region() {
        let l = MemoryLayout::for_size(512 * MIB).unwrap();
        assert_eq!(
            l.regions(),
            &[Region {
                gpa: Gpa(0),
                size: 512 * MIB,
                file_offset: 0
            }]
        );
        assert_eq!(l.total_pages(), 512 * MIB / PAGE);
        assert_eq!(l.gpa_to_offset(Gpa(512 * MIB)), None);
    }

    #[test]
    fn eight_gib_splits_around_mmio_hole() {
        let l = MemoryLayout::for_size(8 * GIB).unwrap();
        assert_eq!(l.regions().len(), 2);
        assert_eq!(l.regions()[1].gpa, Gpa(4 * GIB));
        assert_eq!(l.regions()[1].size, 5 * GIB);
        assert_eq!(l.regions()[1].file_offset, 3 * GIB);
        assert_eq!(l.total_bytes(), 8 * GIB);
        // The hole has no RAM.
        assert_eq!(l.gpa_to_offset(Gpa(3 * GIB)), None);
        assert_eq!(l.gpa_to_offset(Gpa(4 * GIB - 1)), None);
        assert_eq!(l.gpa_to_offset(Gpa(4 * GIB)), Some(3 * GIB));
        assert_eq!(l.gpa_to_offset(Gpa(9 * GIB - 1)), Some(8 * GIB - 1));
        assert_eq!(l.gpa_to_offset(Gpa(9 * GIB)), None);
        assert_eq!(l.offset_to_gpa(3 * GIB - 1), Some(Gpa(3 * GIB - 1)));
        assert_eq!(l.offset_to_gpa(3 * GIB), Some(Gpa(4 * GIB)));
        assert_eq!(l.offset_to_gpa(8 * GIB), None);
        assert_eq!(l.index_to_pfn(3 * GIB / PAGE), Some(Pfn(4 * GIB / PAGE)));
    }

    #[test]
    fn for_size_rejects_bad_sizes() {
        for bytes in [0, 4096, 2 * MIB + 4096, u64::MAX] {
            assert!(matches!(
                MemoryLayout::for_size(bytes),
                Err(LayoutError::BadSize { .. })
            ));
        }
        assert!(matches!(
            MemoryLayout::for_size(MAX_GPA),
            Err(LayoutError::TooLarge { .. })
        ));
        // The largest size that fits ends exactly at MAX_GPA.
        let max = MAX_GPA - (HIGH_RAM_START - LOW_RAM_END);
        let l = MemoryLayout::for_size(max).unwrap();
        assert_eq!(l.regions()[1].gpa_end(), MAX_GPA);
    }

    fn region(gpa: u64, size: u64, file_offset: u64) -> Region {
        Region {
            gpa: Gpa(gpa),
            size,
            file_offset,
        }
    }

    #[test]
    fn from_regions_validates() {
        use LayoutError::*;
        type Check = fn(&LayoutError) -> bool;
        let bad: Vec<(Vec<Region>, Check)> = vec![
            (vec![], |e| matches!(e, Empty)),
            (vec![region(0, MIB, 0)], |e| matches!(e, Misaligned { .. })),
            (vec![region(MIB, 2 * MIB, 0)], |e| {
                matches!(e, Misaligned { .. })
            }),
            (vec![region(0, 0, 0)], |e| matches!(e, Misaligned { .. })),
            (vec![region(0, 2 * MIB, 2 * MIB)], |e| {
                matches!(e, NotPacked { .. })
            }),
            (
                vec![region(4 * MIB, 2 * MIB, 0), region(0, 2 * MIB, 2 * MIB)],
                |e| matches!(e, Unordered { index: 1, .. }),
            ),
            (
                vec![region(0, 4 * MIB, 0), region(2 * MIB, 2 * MIB, 4 * MIB)],
                |e| matches!(e, Unordered { index: 1, .. }),
            ),
            (vec![region(MAX_GPA - 2 * MIB, 4 * MIB, 0)], |e| {
                matches!(e, BeyondLimit { .. })
            }),
            (vec![region(u64::MAX - (2 * MIB - 1), 2 * MIB, 0)], |e| {
                matches!(e, BeyondLimit { .. })
            }),
            (
                (0..65)
                    .map(|i| region(i * 2 * MIB, 2 * MIB, i * 2 * MIB))
                    .collect(),
                |e| matches!(e, TooManyRegions { count: 65, .. }),
            ),
        ];
        for (regions, check) in bad {
            let err = MemoryLayout::from_regions(regions.clone()).unwrap_err();
            assert!(check(&err), "{regions:?} gave {err:?}");
        }
        // Adjacent regions are fine.
        let l = MemoryLayout::from_regions(vec![
            region(0, 2 * MIB, 0),
            region(2 * MIB, 2 * MIB, 2 * MIB),
        ])
        .unwrap();
        assert_eq!(l.total_pages(), 1024);
    }

    #[test]
    fn deserialize_validates() {
        #[derive(Serialize)]
        struct Raw {
            regions: Vec<Region>,
        }
        let good = MemoryLayout::for_size(6 * GIB).unwrap();
        let bytes = to_json(&good);
        let back: MemoryLayout = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(back, good);

        let bad = Raw {
            regions: vec![region(0, 2 * MIB, 4096)],
        };
        let err = serde_json::from_slice::<MemoryLayout>(&to_json(&bad)).unwrap_err();
        assert!(err.to_string().contains("packed"), "{err}");
    }

    fn to_json<T: Serialize>(v: &T) -> Vec<u8> {
        serde_json::to_vec(v).unwrap()
    }

    #[test]
    fn pfn_gpa_conversions() {
        assert_eq!(Gpa(0x1234_5678).pfn(), Pfn(0x12345));
        assert_eq!(Pfn(0x12345).gpa(), Gpa(0x1234_5000));
        assert_eq!(Gpa(0x1234_5678).page_offset(), 0x678);
        assert_eq!(Gpa(u64::MAX).checked_add(1), None);
        assert_eq!(
            MemoryLayout::for_size(2 * MIB)
                .unwrap()
                .pfn_to_index(Pfn(u64::MAX)),
            None
        );
        assert_eq!(
            MemoryLayout::for_size(2 * MIB)
                .unwrap()
                .index_to_pfn(u64::MAX),
            None
        );
    }

    fn arb_layout() -> impl Strategy<Value = MemoryLayout> {
        prop_oneof![
            // Standard layouts from 2 MiB to 64 GiB, both sides of 3 GiB.
            (1u64..=32 * 1024)
                .prop_map(|units| MemoryLayout::for_size(units * REGION_ALIGN).unwrap()),
            // Arbitrary packed layouts: (gap, size) in 2 MiB units.
            prop::collection::vec((0u64..4096, 1u64..4096), 1..8).prop_map(|parts| {
                let mut gpa = 0;
                let mut off = 0;
                let regions = parts
                    .into_iter()
                    .map(|(gap, size)| {
                        gpa += gap * REGION_ALIGN;
                        let r = region(gpa, size * REGION_ALIGN, off);
                        gpa += r.size;
                        off += r.size;
                        r
                    })
                    .collect();
                MemoryLayout::from_regions(regions).unwrap()
            }),
        ]
    }

    proptest! {
        #[test]
        fn offset_gpa_pfn_index_round_trip(layout in arb_layout(), frac in 0.0f64..1.0, byte in 0u64..PAGE) {
            let pages = layout.total_pages();
            let index = ((pages as f64 * frac) as u64).min(pages - 1);
            let offset = index * PAGE + byte;

            let gpa = layout.offset_to_gpa(offset).expect("offset inside layout");
            prop_assert_eq!(layout.gpa_to_offset(gpa), Some(offset));
            prop_assert_eq!(gpa.page_offset(), byte);

            let pfn = layout.index_to_pfn(index).expect("index inside layout");
            prop_assert_eq!(pfn, gpa.pfn());
            prop_assert_eq!(layout.pfn_to_index(pfn), Some(index));
            prop_assert_eq!(layout.pfn_to_index(gpa.pfn()), Some(index));

            // The region holding it agrees with both views.
            let r = layout.region_for_gpa(gpa).unwrap();
            prop_assert_eq!(layout.region_for_offset(offset), Some(r));
            prop_assert!(r.first_index() <= index && index < r.first_index() + r.pages());

            // Past the end nothing maps.
            prop_assert_eq!(layout.offset_to_gpa(layout.total_bytes()), None);
            prop_assert_eq!(layout.index_to_pfn(pages), None);
        }

        #[test]
        fn gaps_between_regions_do_not_map(layout in arb_layout()) {
            let regions = layout.regions();
            for pair in regions.windows(2) {
                if pair[0].gpa_end() < pair[1].gpa.0 {
                    prop_assert_eq!(layout.gpa_to_offset(Gpa(pair[0].gpa_end())), None);
                    prop_assert_eq!(layout.gpa_to_offset(Gpa(pair[1].gpa.0 - 1)), None);
                }
                // Regions meet in the file with no gap.
                prop_assert_eq!(pair[0].file_end(), pair[1].file_offset);
            }
            let sum: u64 = regions.iter().map(|r| r.size).sum();
            prop_assert_eq!(sum, layout.total_bytes());
        }
    }
}
