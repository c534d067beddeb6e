//! Tests of [`GuestMemory`] against real memfds.

use super::*;
use crate::layout::Region;
use std::time::Instant;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn mem(bytes: u64) -> GuestMemory {
    GuestMemory::create("guestmem-test", MemoryLayout::for_size(bytes).unwrap()).unwrap()
}

/// Every byte, read through the accessor (allocates holes; small memories only).
fn contents(m: &GuestMemory) -> Vec<u8> {
    let mut v = vec![0u8; m.len() as usize];
    m.read_at(0, &mut v).unwrap();
    v
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

#[test]
fn send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<GuestMemory>();
}

#[test]
fn fresh_memory_reads_zero_and_has_no_data() {
    let m = mem(4 * MIB);
    assert_eq!(m.len(), 4 * MIB);
    assert_eq!(m.data_ranges().unwrap(), vec![]);
    let mut page = [1u8; PAGE_SIZE];
    m.read_page(17, &mut page).unwrap();
    assert!(crate::is_zero_page(&page));
}

#[test]
fn write_read_round_trip() {
    let m = mem(4 * MIB);
    let data = pattern(3, 10_000);
    // Unaligned, crossing pages.
    m.write_at(4095, &data).unwrap();
    let mut back = vec![0u8; data.len()];
    m.read_at(4095, &mut back).unwrap();
    assert_eq!(back, data);
    // The byte before is untouched.
    let mut b = [9u8; 1];
    m.read_at(4094, &mut b).unwrap();
    assert_eq!(b, [0]);

    let page: [u8; PAGE_SIZE] = pattern(7, PAGE_SIZE).try_into().unwrap();
    m.write_page(1023, &page).unwrap();
    let mut out = [0u8; PAGE_SIZE];
    m.read_page(1023, &mut out).unwrap();
    assert_eq!(out, page);
    // Page index and gpa agree for the one-region layout.
    m.read_gpa(Gpa(1023 * PAGE), &mut out).unwrap();
    assert_eq!(out, page);
    // And the raw pointers point at the same bytes.
    // SAFETY: page 1023 is inside the 4 MiB mapping owned by `m`.
    let first = unsafe { m.page_addr(1023).unwrap().read() };
    assert_eq!(first, page[0]);
    assert_eq!(m.host_addr(Gpa(1023 * PAGE)), m.page_addr(1023));
    assert_eq!(m.host_addr(Gpa(0)), Some(m.as_ptr()));
}

#[test]
fn accesses_outside_memory_are_errors() {
    let m = mem(2 * MIB);
    let mut buf = [0u8; 16];
    assert!(matches!(
        m.read_at(2 * MIB - 8, &mut buf),
        Err(GuestMemoryError::OutOfRange { offset, len: 16, size }) if offset == 2 * MIB - 8 && size == 2 * MIB
    ));
    assert!(matches!(
        m.write_at(u64::MAX - 4, &buf),
        Err(GuestMemoryError::OutOfRange { .. })
    ));
    // An empty access at the very end is fine.
    m.read_at(2 * MIB, &mut []).unwrap();
    let mut page = [0u8; PAGE_SIZE];
    assert!(matches!(
        m.read_page(512, &mut page),
        Err(GuestMemoryError::PagesOutOfRange {
            index: 512,
            count: 1,
            total: 512
        })
    ));
    assert!(m.write_page(u64::MAX, &page).is_err());
    assert!(matches!(
        m.read_gpa(Gpa(2 * MIB), &mut buf),
        Err(GuestMemoryError::NotRam { .. })
    ));
    assert_eq!(m.host_addr(Gpa(2 * MIB)), None);
    assert_eq!(m.page_addr(512), None);
    assert!(m.punch_hole(511, 2).is_err());
    assert!(m.punch_hole(u64::MAX, 2).is_err());
}

#[test]
fn gpa_access_spans_adjacent_regions_but_not_gaps() {
    let layout = MemoryLayout::from_regions(vec![
        Region {
            gpa: Gpa(0),
            size: 2 * MIB,
            file_offset: 0,
        },
        Region {
            gpa: Gpa(2 * MIB),
            size: 2 * MIB,
            file_offset: 2 * MIB,
        },
        Region {
            gpa: Gpa(8 * MIB),
            size: 2 * MIB,
            file_offset: 4 * MIB,
        },
    ])
    .unwrap();
    let m = GuestMemory::create("regions", layout).unwrap();
    let data = pattern(1, 64);
    m.write_gpa(Gpa(2 * MIB - 32), &data).unwrap();
    let mut back = vec![0u8; 64];
    m.read_at(2 * MIB - 32, &mut back).unwrap();
    assert_eq!(back, data);

    // Region 2 lives at file offset 4 MiB.
    m.write_gpa(Gpa(8 * MIB + 5), &data).unwrap();
    m.read_at(4 * MIB + 5, &mut back).unwrap();
    assert_eq!(back, data);

    // Crossing from region 1 into the gap fails and writes nothing.
    assert!(matches!(
        m.write_gpa(Gpa(4 * MIB - 32), &data),
        Err(GuestMemoryError::NotRam { len: 64, .. })
    ));
    m.read_at(4 * MIB - 32, &mut back[..32]).unwrap();
    assert!(back[..32].iter().all(|b| *b == 0));
}

#[test]
fn from_fd_shares_the_same_bytes() {
    let a = mem(4 * MIB);
    let fd = a.fd().try_clone_to_owned().unwrap();
    let b = GuestMemory::from_fd(fd, a.layout().clone()).unwrap();
    let data = pattern(5, 5000);
    a.write_at(MIB + 3, &data).unwrap();
    let mut back = vec![0u8; data.len()];
    b.read_at(MIB + 3, &mut back).unwrap();
    assert_eq!(back, data);
    // And the other way round.
    b.write_at(0, b"hello").unwrap();
    let mut hello = [0u8; 5];
    a.read_at(0, &mut hello).unwrap();
    assert_eq!(&hello, b"hello");
    assert_eq!(a.digest(), b.digest());
}

#[test]
fn from_fd_checks_size() {
    let a = mem(4 * MIB);
    let fd = a.fd().try_clone_to_owned().unwrap();
    let err = GuestMemory::from_fd(fd, MemoryLayout::for_size(2 * MIB).unwrap()).unwrap_err();
    assert!(matches!(
        err,
        GuestMemoryError::SizeMismatch { expected, found } if expected == 2 * MIB && found == 4 * MIB
    ));
}

#[test]
fn created_memfd_cannot_be_resized() {
    let m = mem(2 * MIB);
    let f = File::from(m.fd().try_clone_to_owned().unwrap());
    assert!(f.set_len(MIB).is_err(), "shrink must be sealed");
    assert!(f.set_len(4 * MIB).is_err(), "grow must be sealed");
    assert_eq!(f.metadata().unwrap().len(), 2 * MIB);
}

#[test]
fn name_with_nul_is_refused() {
    let err = GuestMemory::create("a\0b", MemoryLayout::for_size(2 * MIB).unwrap()).unwrap_err();
    assert!(matches!(err, GuestMemoryError::InvalidName { .. }));
}

/// Pages in `ranges`, as a sorted list.
fn covered(ranges: &[Range<u64>]) -> Vec<u64> {
    ranges.iter().flat_map(|r| r.clone()).collect()
}

#[test]
fn data_ranges_cover_writes_and_skip_holes() {
    let m = mem(32 * MIB);
    let written = [0u64, 1, 2, 700, 701, 3000, 8191];
    for &i in &written {
        m.write_at(i * PAGE + 100, &[0xaa]).unwrap();
    }
    let ranges = m.data_ranges().unwrap();
    // Sorted, non-empty, non-adjacent, inside memory.
    for w in ranges.windows(2) {
        assert!(w[0].end < w[1].start, "{ranges:?}");
    }
    assert!(ranges.iter().all(|r| r.start < r.end && r.end <= 8192));
    let pages = covered(&ranges);
    for i in written {
        assert!(pages.contains(&i), "page {i} not in {ranges:?}");
    }
    // Whatever the host's shmem page size (4 KiB or 2 MiB THP), 2 MiB blocks
    // that were never written stay holes.
    let blocks_written: Vec<u64> = written.iter().map(|i| i / 512).collect();
    for p in &pages {
        assert!(
            blocks_written.contains(&(p / 512)),
            "page {p} of an untouched block is data"
        );
    }
    // With 4 KiB shmem pages the answer is exact.
    if pages.len() < 512 {
        assert_eq!(ranges, vec![0..3, 700..702, 3000..3001, 8191..8192]);
    }
}

#[test]
fn punch_hole_zeroes_pages() {
    let m = mem(4 * MIB);
    for i in 10..20 {
        let page: [u8; PAGE_SIZE] = pattern(i as u8, PAGE_SIZE).try_into().unwrap();
        m.write_page(i, &page).unwrap();
    }
    let before = m.digest();
    m.punch_hole(12, 3).unwrap();
    let mut page = [0u8; PAGE_SIZE];
    for i in 10..20 {
        m.read_page(i, &mut page).unwrap();
        let expect_zero = (12..15).contains(&i);
        assert_eq!(crate::is_zero_page(&page), expect_zero, "page {i}");
        if !expect_zero {
            assert_eq!(page.as_slice(), pattern(i as u8, PAGE_SIZE).as_slice());
        }
    }
    assert_ne!(m.digest(), before);
    m.punch_hole(0, 0).unwrap();
}

#[test]
fn punched_pages_become_holes() {
    let m = mem(4 * MIB);
    for i in 0..8 {
        m.write_page(i, &[1; PAGE_SIZE]).unwrap();
    }
    m.punch_hole(2, 4).unwrap();
    let pages = covered(&m.data_ranges().unwrap());
    for i in 2..6 {
        assert!(
            !pages.contains(&i) || pages.len() >= 512,
            "page {i} still data: {pages:?}"
        );
    }
}

#[test]
fn digest_equals_hash_of_plain_bytes() {
    let m = mem(8 * MIB);
    // Data in a few places, including the last page, with holes between.
    m.write_at(0, &pattern(1, 3 * PAGE_SIZE)).unwrap();
    m.write_at(5 * MIB + 17, &pattern(2, 100_000)).unwrap();
    m.write_page(2047, &[0x5a; PAGE_SIZE]).unwrap();
    let d = m.digest();
    assert_eq!(d, m.digest(), "deterministic");
    // `contents` reads every byte, so compute it after the digest.
    assert_eq!(d, Digest::of_bytes(&contents(&m)));
}

#[test]
fn digest_changes_when_one_byte_flips() {
    let m = mem(4 * MIB);
    m.write_at(0, &pattern(9, 64 * PAGE_SIZE)).unwrap();
    let base = m.digest();
    for offset in [0, 12345, 64 * PAGE - 1, 2 * MIB, 4 * MIB - 1] {
        let mut b = [0u8];
        m.read_at(offset, &mut b).unwrap();
        m.write_at(offset, &[b[0] ^ 0x10]).unwrap();
        assert_ne!(m.digest(), base, "flip at {offset:#x}");
        m.write_at(offset, &b).unwrap();
        assert_eq!(m.digest(), base, "restored at {offset:#x}");
    }
}

#[test]
fn equal_contents_give_equal_digests_whatever_the_holes() {
    // `a` is sparse; `b` holds the same bytes with every page materialised
    // (explicit zeros), so the digest must not depend on where holes are.
    let a = mem(4 * MIB);
    let b = mem(4 * MIB);
    let data = pattern(4, 3 * PAGE_SIZE);
    a.write_at(MIB, &data).unwrap();
    b.write_at(0, &vec![0u8; 4 * MIB as usize]).unwrap();
    b.write_at(MIB, &data).unwrap();
    assert_ne!(a.data_ranges().unwrap(), b.data_ranges().unwrap());
    assert_eq!(a.digest(), b.digest());
    assert_eq!(a.digest(), Digest::of_bytes(&contents(&b)));
}

/// Hash of `size` bytes that are zero except for `pieces` (offset, bytes),
/// computed independently of GuestMemory.
fn oracle_digest(size: u64, pieces: &[(u64, &[u8])]) -> Digest {
    let mut h = Xxh3::new();
    let zeros = vec![0u8; 3 * MIB as usize + 7]; // odd chunking on purpose
    let mut pos = 0;
    let zero_fill = |h: &mut Xxh3, mut n: u64| {
        while n > 0 {
            let k = n.min(zeros.len() as u64) as usize;
            h.update(&zeros[..k]);
            n -= k as u64;
        }
    };
    for (off, bytes) in pieces {
        zero_fill(&mut h, off - pos);
        h.update(bytes);
        pos = off + bytes.len() as u64;
    }
    zero_fill(&mut h, size - pos);
    Digest(h.digest128())
}

#[test]
fn eight_gib_stays_sparse() {
    let layout = MemoryLayout::for_size(8 * GIB).unwrap();
    let m = GuestMemory::create("big", layout).unwrap();
    assert_eq!(m.len(), 8 * GIB);
    let low = pattern(1, PAGE_SIZE);
    let high = pattern(2, PAGE_SIZE);
    let last = pattern(3, PAGE_SIZE);
    m.write_gpa(Gpa(3 * GIB - PAGE), &low).unwrap();
    m.write_gpa(Gpa(4 * GIB), &high).unwrap();
    m.write_gpa(Gpa(9 * GIB - PAGE), &last).unwrap();
    // The MMIO hole is not RAM.
    assert!(m.write_gpa(Gpa(3 * GIB), &[1]).is_err());
    assert!(m.write_gpa(Gpa(9 * GIB), &[1]).is_err());

    let pages_3g = 3 * GIB / PAGE;
    let expect = vec![
        pages_3g - 1..pages_3g + 1,
        2 * 1024 * 1024 - 1..2 * 1024 * 1024,
    ];
    let ranges = m.data_ranges().unwrap();
    if covered(&ranges).len() < 512 {
        assert_eq!(ranges, expect);
    }
    let d = m.digest();
    // The digest read no holes: the data ranges are unchanged.
    assert_eq!(m.data_ranges().unwrap(), ranges);
    assert_eq!(
        d,
        oracle_digest(
            8 * GIB,
            &[
                (3 * GIB - PAGE, &low),
                (3 * GIB, &high),
                (8 * GIB - PAGE, &last)
            ]
        )
    );
    let mut back = [0u8; PAGE_SIZE];
    m.read_page(8 * GIB / PAGE - 1, &mut back).unwrap();
    assert_eq!(back.as_slice(), last.as_slice());
}

/// Digest throughput over dense data and over holes, against memcpy.
/// `cargo test --release -p guestmem -- --ignored --nocapture digest_speed`
#[test]
#[ignore]
fn digest_speed() {
    let m = mem(GIB);
    let chunk = pattern(11, 64 << 20);
    for i in 0..16 {
        m.write_at(i * (64 << 20), &chunk).unwrap();
    }
    let d = m.digest(); // warm up
    for chunk in [16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20] {
        let t = Instant::now();
        assert_eq!(m.digest_chunked(chunk), d);
        let s = t.elapsed().as_secs_f64();
        println!(
            "digest, {} KiB bounce buffer: {:.2} GiB/s",
            chunk >> 10,
            1.0 / s
        );
    }
    let t = Instant::now();
    assert_eq!(m.digest(), d);
    let dense = t.elapsed().as_secs_f64();

    let mut buf = vec![0u8; GIB as usize];
    m.read_at(0, &mut buf).unwrap();
    let t = Instant::now();
    m.read_at(0, &mut buf).unwrap();
    let copy = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let plain = Digest::of_bytes(&buf);
    let plain_s = t.elapsed().as_secs_f64();
    assert_eq!(plain, d);

    let sparse = GuestMemory::create("sparse", MemoryLayout::for_size(8 * GIB).unwrap()).unwrap();
    let t = Instant::now();
    std::hint::black_box(sparse.digest());
    let holes = t.elapsed().as_secs_f64();
    println!(
        "digest dense {:.2} GiB/s, xxh3-128 of a plain buffer {:.2} GiB/s, memcpy {:.2} GiB/s, digest of 8 GiB of holes {:.2} s ({:.2} GiB/s)",
        1.0 / dense,
        1.0 / plain_s,
        1.0 / copy,
        holes,
        8.0 / holes
    );
}

mod model {
    use super::*;
    use proptest::prelude::*;

    const SIZE: u64 = 4 * MIB;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Random writes and hole punches against a plain Vec as the model:
        /// contents, digest and data ranges must all agree with it.
        #[test]
        fn matches_vec_model(ops in prop::collection::vec(
            (any::<bool>(), 0..SIZE, 1usize..20_000, any::<u8>()), 1..24)
        ) {
            let m = mem(SIZE);
            let mut model = vec![0u8; SIZE as usize];
            let mut touched = std::collections::BTreeSet::new();
            for (punch, offset, len, seed) in ops {
                if punch {
                    let index = offset / PAGE;
                    let count = (len as u64 / PAGE).min(SIZE / PAGE - index);
                    m.punch_hole(index, count).unwrap();
                    let (a, b) = ((index * PAGE) as usize, ((index + count) * PAGE) as usize);
                    model[a..b].fill(0);
                } else {
                    let len = len.min((SIZE - offset) as usize);
                    let data = pattern(seed, len);
                    m.write_at(offset, &data).unwrap();
                    model[offset as usize..offset as usize + len].copy_from_slice(&data);
                    touched.extend(offset / PAGE..(offset + len as u64).div_ceil(PAGE));
                }
            }
            // Every page with non-zero model bytes must be inside a data range.
            let pages = covered(&m.data_ranges().unwrap());
            for (i, page) in model.chunks_exact(PAGE_SIZE).enumerate() {
                if page.iter().any(|b| *b != 0) {
                    prop_assert!(pages.contains(&(i as u64)), "page {} lost", i);
                }
            }
            // Pages never written stay holes (exact on 4 KiB shmem pages).
            if pages.len() < 512 {
                prop_assert!(pages.iter().all(|p| touched.contains(p)));
            }
            prop_assert_eq!(m.digest(), Digest::of_bytes(&model));
            prop_assert!(contents(&m) == model);
        }
    }
}
