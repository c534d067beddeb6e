//! Glue between guest RAM (`guestmem`) and the wire (`transport`): the
//! page source and sink over a memfd mapping, layout conversion both ways,
//! and the envelope the daemon puts in the protocol's opaque `State` frame.
//!
//! Page index `i` on the wire is memfd page `i`: both layouts number pages
//! in region order and guestmem packs regions back to back in the file.

use std::io;
use std::sync::Arc;

use guestmem::{Digest, Gpa, GuestMemory, Region};
use transport::layout::{self as wire, PageIndex, PAGE_SIZE};
use transport::session::{PageSink, PageSource};

use crate::model::VmSpec;

const PAGE: u64 = PAGE_SIZE as u64;

/// Guest RAM seen by a migration session (either side).
#[derive(Clone, Debug)]
pub struct GuestPages(pub Arc<GuestMemory>);

impl PageSource for GuestPages {
    fn read_page(&self, index: PageIndex, out: &mut [u8; PAGE_SIZE]) -> io::Result<()> {
        self.0.read_page(index.0, out).map_err(io::Error::other)
    }
}

impl PageSink for GuestPages {
    fn write_page(&mut self, index: PageIndex, data: &[u8; PAGE_SIZE]) -> io::Result<()> {
        self.0.write_page(index.0, data).map_err(io::Error::other)
    }

    fn write_zero(&mut self, start: PageIndex, count: u64) -> io::Result<()> {
        // A punched page reads as zero and frees its memory; on a fresh
        // memfd (all holes) this costs nothing.
        self.0.punch_hole(start.0, count).map_err(io::Error::other)
    }

    /// The base of an XOR delta: what the source sent before.
    fn read_back(&self, index: PageIndex, out: &mut [u8; PAGE_SIZE]) -> io::Result<()> {
        self.0.read_page(index.0, out).map_err(io::Error::other)
    }

    fn write_pages(&mut self, first: PageIndex, data: &[u8]) -> io::Result<()> {
        let offset = first
            .0
            .checked_mul(PAGE)
            .ok_or_else(|| io::Error::other("page index overflows"))?;
        self.0.write_at(offset, data).map_err(io::Error::other)
    }

    /// A plain mapping: pieces of a batch go straight in, cut pages too.
    fn writes_bytes(&self) -> bool {
        true
    }

    fn write_bytes(&mut self, at: u64, data: &[u8]) -> io::Result<()> {
        self.0.write_at(at, data).map_err(io::Error::other)
    }
}

/// A layout that one side cannot express.
#[derive(Debug, thiserror::Error)]
pub enum ConvertLayoutError {
    #[error("region {index} is not page aligned")]
    Unaligned { index: usize },
    #[error("wire layout refused")]
    Wire(#[source] wire::LayoutError),
    #[error("guest layout refused")]
    Guest(#[source] guestmem::LayoutError),
}

/// The guest's layout as sent in `Hello`.
pub fn to_wire_layout(
    layout: &guestmem::MemoryLayout,
) -> Result<wire::MemoryLayout, ConvertLayoutError> {
    let mut regions = Vec::with_capacity(layout.regions().len());
    for (index, r) in layout.regions().iter().enumerate() {
        if r.gpa.0 % PAGE != 0 || r.size % PAGE != 0 {
            return Err(ConvertLayoutError::Unaligned { index });
        }
        regions.push(wire::Region {
            first_pfn: wire::Pfn(r.gpa.0 / PAGE),
            pages: r.size / PAGE,
        });
    }
    wire::MemoryLayout::new(regions).map_err(ConvertLayoutError::Wire)
}

/// A peer's layout as guest RAM to create here (regions packed in order).
pub fn to_guest_layout(
    layout: &wire::MemoryLayout,
) -> Result<guestmem::MemoryLayout, ConvertLayoutError> {
    let mut regions = Vec::with_capacity(layout.regions().len());
    let mut offset = 0u64;
    for (index, r) in layout.regions().iter().enumerate() {
        let gpa = r
            .first_pfn
            .0
            .checked_mul(PAGE)
            .ok_or(ConvertLayoutError::Unaligned { index })?;
        let size = r
            .pages
            .checked_mul(PAGE)
            .ok_or(ConvertLayoutError::Unaligned { index })?;
        regions.push(Region {
            gpa: Gpa(gpa),
            size,
            file_offset: offset,
        });
        offset = offset
            .checked_add(size)
            .ok_or(ConvertLayoutError::Unaligned { index })?;
    }
    guestmem::MemoryLayout::from_regions(regions).map_err(ConvertLayoutError::Guest)
}

/// Page ranges as the session wants them.
pub fn page_ranges(ranges: impl IntoIterator<Item = std::ops::Range<u64>>) -> Vec<wire::PageRange> {
    ranges
        .into_iter()
        .filter(|r| r.end > r.start)
        .map(|r| wire::PageRange::new(r.start, r.end - r.start))
        .collect()
}

/// The pages of `0..total` not covered by `data` (ascending, disjoint).
pub fn holes(data: &[std::ops::Range<u64>], total: u64) -> Vec<std::ops::Range<u64>> {
    let mut out = Vec::new();
    let mut pos = 0;
    for r in data {
        let start = r.start.min(total);
        if start > pos {
            out.push(pos..start);
        }
        pos = pos.max(r.end.min(total));
    }
    if pos < total {
        out.push(pos..total);
    }
    out
}

const ENVELOPE_MAGIC: &[u8; 8] = b"MGDENV02";
/// Magic, two lengths, the digest (flag + 16 bytes), the post-copy
/// digests (flag + 2 x 16 bytes).
const ENVELOPE_HEADER: usize = 8 + 4 + 4 + 1 + 16 + 1 + 32;
/// A VM spec is a few hundred bytes of JSON.
const MAX_SPEC_BYTES: usize = 64 << 10;
/// What the VMM accepts as a state blob.
const MAX_VM_STATE_BYTES: usize = 16 << 20;

/// What the source puts in the protocol's `State` frame: everything the
/// destination needs to run the guest as this daemon's VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateEnvelope {
    pub spec: VmSpec,
    /// The VMM's `save_state` blob, passed to the destination VMM as is.
    pub vm_state: Vec<u8>,
    /// Digest of the source's memory while paused (verify mode only).
    pub digest: Option<Digest>,
    /// Post-copy in verify mode: page-set digests of what the target
    /// holds already and of what it still needs (see [`page_set_digest`]).
    pub post_copy: Option<PostCopyDigests>,
}

/// Verification of a post-copy migration, which cannot compare whole
/// memories: the guest runs on the target while pages still arrive. The
/// target checks the pages it holds before it resumes the guest, and the
/// pages it receives afterwards as each is installed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PostCopyDigests {
    /// Pages the target already holds (not in the needed set).
    pub present: u128,
    /// Pages the target still needs, as they were on the paused source.
    pub needed: u128,
}

/// Digest of one page for [`page_set_digest`].
pub fn page_digest(index: u64, data: &[u8; PAGE_SIZE]) -> u128 {
    xxhash_rust::xxh3::xxh3_128_with_seed(data, index)
}

/// Order-independent digest of the pages `pick` selects: the wrapping sum
/// of [`page_digest`] over them, so pages can be added as they arrive in
/// any order. Holes of the memfd count as zero pages and are not read
/// (on a post-copy target, reading a hole through the mapping would fill
/// it and hide it from userfaultfd).
pub fn page_set_digest(mem: &GuestMemory, pick: impl Fn(u64) -> bool) -> io::Result<u128> {
    let total = mem.layout().total_pages();
    let data = mem.data_ranges().map_err(io::Error::other)?;
    let zero = [0u8; PAGE_SIZE];
    let mut sum = 0u128;
    for r in holes(&data, total) {
        for i in r.filter(|&i| pick(i)) {
            sum = sum.wrapping_add(page_digest(i, &zero));
        }
    }
    let mut page = [0u8; PAGE_SIZE];
    for r in data {
        for i in r.filter(|&i| pick(i)) {
            mem.read_page(i, &mut page).map_err(io::Error::other)?;
            sum = sum.wrapping_add(page_digest(i, &page));
        }
    }
    Ok(sum)
}

/// A state envelope that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum DecodeEnvelopeError {
    #[error("state envelope is {len} bytes, shorter than its header")]
    Short { len: usize },
    #[error("state envelope has a bad magic")]
    Magic,
    #[error("state envelope part {what} is {len} bytes, over the cap of {max}")]
    TooLarge {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("state envelope length fields do not add up to its size")]
    Length,
    #[error("vm spec in the state envelope is invalid")]
    Spec(#[source] serde_json::Error),
}

impl StateEnvelope {
    pub fn encode(&self) -> Vec<u8> {
        let spec = serde_json::to_vec(&self.spec).expect("a vm spec serializes");
        let mut out = Vec::with_capacity(ENVELOPE_HEADER + spec.len() + self.vm_state.len());
        out.extend_from_slice(ENVELOPE_MAGIC);
        out.extend_from_slice(&(spec.len() as u32).to_le_bytes());
        out.extend_from_slice(&(self.vm_state.len() as u32).to_le_bytes());
        out.push(u8::from(self.digest.is_some()));
        out.extend_from_slice(&self.digest.map(|d| d.0).unwrap_or(0).to_le_bytes());
        out.push(u8::from(self.post_copy.is_some()));
        let pc = self.post_copy.unwrap_or(PostCopyDigests {
            present: 0,
            needed: 0,
        });
        out.extend_from_slice(&pc.present.to_le_bytes());
        out.extend_from_slice(&pc.needed.to_le_bytes());
        out.extend_from_slice(&spec);
        out.extend_from_slice(&self.vm_state);
        out
    }

    /// Parses peer bytes: lengths are checked against caps and the total
    /// before anything is copied.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeEnvelopeError> {
        if bytes.len() < ENVELOPE_HEADER {
            return Err(DecodeEnvelopeError::Short { len: bytes.len() });
        }
        if &bytes[..8] != ENVELOPE_MAGIC {
            return Err(DecodeEnvelopeError::Magic);
        }
        let u32_at = |at: usize| {
            let mut b = [0u8; 4];
            b.copy_from_slice(&bytes[at..at + 4]);
            u32::from_le_bytes(b) as usize
        };
        let spec_len = u32_at(8);
        let state_len = u32_at(12);
        for (what, len, max) in [
            ("spec", spec_len, MAX_SPEC_BYTES),
            ("vm state", state_len, MAX_VM_STATE_BYTES),
        ] {
            if len > max {
                return Err(DecodeEnvelopeError::TooLarge { what, len, max });
            }
        }
        if ENVELOPE_HEADER + spec_len + state_len != bytes.len() {
            return Err(DecodeEnvelopeError::Length);
        }
        let has_digest = bytes[16] != 0;
        let u128_at = |at: usize| {
            let mut b = [0u8; 16];
            b.copy_from_slice(&bytes[at..at + 16]);
            u128::from_le_bytes(b)
        };
        let digest = u128_at(17);
        let post_copy = (bytes[33] != 0).then(|| PostCopyDigests {
            present: u128_at(34),
            needed: u128_at(50),
        });
        let body = &bytes[ENVELOPE_HEADER..];
        let spec = serde_json::from_slice(&body[..spec_len]).map_err(DecodeEnvelopeError::Spec)?;
        Ok(Self {
            spec,
            vm_state: body[spec_len..].to_vec(),
            digest: has_digest.then_some(Digest(digest)),
            post_copy,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Quantity;

    fn spec() -> VmSpec {
        VmSpec {
            name: "a".into(),
            labels: Default::default(),
            memory: Quantity::mib(64),
            vcpus: 2,
            workload: Default::default(),
        }
    }

    #[test]
    fn envelope_round_trips_and_rejects_garbage() {
        let pc = PostCopyDigests {
            present: 3 << 100,
            needed: 5,
        };
        for (digest, post_copy) in [
            (None, None),
            (
                Some(Digest(0x1234_5678_9abc_def0_1122_3344_5566_7788)),
                None,
            ),
            (Some(Digest(9)), Some(pc)),
        ] {
            let env = StateEnvelope {
                spec: spec(),
                vm_state: vec![7; 1000],
                digest,
                post_copy,
            };
            let bytes = env.encode();
            assert_eq!(StateEnvelope::decode(&bytes).unwrap(), env);
            // Every truncation is an error, never a panic.
            for cut in 0..bytes.len() {
                assert!(StateEnvelope::decode(&bytes[..cut]).is_err(), "cut {cut}");
            }
        }
        let mut huge = StateEnvelope {
            spec: spec(),
            vm_state: vec![],
            digest: None,
            post_copy: None,
        }
        .encode();
        huge[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            StateEnvelope::decode(&huge),
            Err(DecodeEnvelopeError::TooLarge { .. })
        ));
        huge[..8].copy_from_slice(b"XXXXXXXX");
        assert!(matches!(
            StateEnvelope::decode(&huge),
            Err(DecodeEnvelopeError::Magic)
        ));
    }

    #[test]
    fn page_set_digests_add_up_in_any_order() {
        let layout = guestmem::MemoryLayout::for_size(4 << 20).unwrap();
        let mem = GuestMemory::create("t", layout).unwrap();
        let total = mem.layout().total_pages();
        for i in [3u64, 4, 100, 777] {
            mem.write_page(i, &[i as u8 + 1; PAGE_SIZE]).unwrap();
        }
        let all = page_set_digest(&mem, |_| true).unwrap();
        let even = page_set_digest(&mem, |i| i % 2 == 0).unwrap();
        let odd = page_set_digest(&mem, |i| i % 2 == 1).unwrap();
        assert_eq!(even.wrapping_add(odd), all);
        // Page by page, in reverse order, gives the same sum.
        let mut sum = 0u128;
        let mut page = [0u8; PAGE_SIZE];
        for i in (0..total).rev() {
            mem.read_page(i, &mut page).unwrap();
            sum = sum.wrapping_add(page_digest(i, &page));
        }
        assert_eq!(sum, all);
        // One changed byte, or the same data at another index, differs.
        mem.write_page(100, &[0; PAGE_SIZE]).unwrap();
        assert_ne!(page_set_digest(&mem, |_| true).unwrap(), all);
        mem.write_page(101, &[101; PAGE_SIZE]).unwrap();
        assert_ne!(page_set_digest(&mem, |_| true).unwrap(), all);
    }

    #[test]
    fn layouts_convert_both_ways() {
        for bytes in [64u64 << 20, 1 << 30, 5 << 30] {
            let g = guestmem::MemoryLayout::for_size(bytes).unwrap();
            let w = to_wire_layout(&g).unwrap();
            assert_eq!(w.total_bytes(), bytes);
            assert_eq!(to_guest_layout(&w).unwrap(), g);
        }
    }

    #[test]
    fn holes_complement_data() {
        assert_eq!(holes(&[], 10), vec![0..10]);
        assert!(holes(std::slice::from_ref(&(0..10)), 10).is_empty());
        assert_eq!(holes(&[2..4, 6..7], 10), vec![0..2, 4..6, 7..10]);
    }

    #[test]
    fn sink_writes_and_zeroes_guest_memory() {
        let layout = guestmem::MemoryLayout::for_size(4 << 20).unwrap();
        let mem = Arc::new(GuestMemory::create("t", layout).unwrap());
        let mut pages = GuestPages(mem.clone());
        let data = vec![0xAB; 3 * PAGE_SIZE];
        pages.write_pages(PageIndex(5), &data).unwrap();
        let mut out = [0u8; PAGE_SIZE];
        pages.read_page(PageIndex(7), &mut out).unwrap();
        assert!(out.iter().all(|&b| b == 0xAB));
        pages.write_zero(PageIndex(6), 2).unwrap();
        pages.read_page(PageIndex(7), &mut out).unwrap();
        assert!(out.iter().all(|&b| b == 0));
        pages.read_page(PageIndex(5), &mut out).unwrap();
        assert!(out.iter().all(|&b| b == 0xAB));
        assert!(pages.write_pages(PageIndex(1 << 40), &data).is_err());
    }
}
