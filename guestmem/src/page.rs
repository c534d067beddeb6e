//! Per-page helpers on a copy of a page: zero detection (zero pages go on the
//! wire as runs) and a 64-bit hash (for verification and delta bookkeeping),
//! plus the [`Digest`] type for whole-memory hashes.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::layout::PAGE_SIZE;

/// Bytes checked between early exits. Large enough for the compiler to
/// vectorise the OR-reduction, small enough that a non-zero page (the common
/// case for used memory) is usually rejected after the first block.
const ZERO_BLOCK: usize = 256;

/// Whether every byte of `page` is zero.
///
/// OR-reduces 16-byte lanes block by block; a plain `iter().all(|b| *b == 0)`
/// is byte-at-a-time and several times slower.
pub fn is_zero_page(page: &[u8; PAGE_SIZE]) -> bool {
    page.chunks_exact(ZERO_BLOCK).all(|block| {
        block
            .chunks_exact(16)
            .map(|lane| {
                // chunks_exact(16) yields exactly 16 bytes, so the conversion
                // cannot fail; it compiles to an unaligned 128-bit load.
                u128::from_ne_bytes(lane.try_into().unwrap_or([0xff; 16]))
            })
            .fold(0, |acc, v| acc | v)
            == 0
    })
}

/// 64-bit xxh3 of one page.
pub fn page_hash(page: &[u8; PAGE_SIZE]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(page)
}

/// xxh3-128 of all of guest memory in page-index order; see
/// [`GuestMemory::digest`](crate::GuestMemory::digest). Displays as 32 lower-case
/// hex digits.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Digest(pub u128);

impl Digest {
    /// Digest of a plain byte string, equal to the digest of a memory holding
    /// exactly these bytes.
    pub fn of_bytes(bytes: &[u8]) -> Digest {
        Digest(xxhash_rust::xxh3::xxh3_128(bytes))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// A digest string was not 32 hex digits.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("digest is not 32 hex digits")]
pub struct ParseDigestError;

impl FromStr for Digest {
    type Err = ParseDigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // from_str_radix alone would accept a sign and short strings.
        if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ParseDigestError);
        }
        u128::from_str_radix(s, 16)
            .map(Digest)
            .map_err(|_| ParseDigestError)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::Instant;

    #[test]
    fn zero_page_detects_any_single_byte() {
        let mut page = [0u8; PAGE_SIZE];
        assert!(is_zero_page(&page));
        for i in 0..PAGE_SIZE {
            page[i] = 1 << (i % 8);
            assert!(!is_zero_page(&page), "byte {i}");
            page[i] = 0;
        }
        assert!(is_zero_page(&page));
    }

    proptest! {
        #[test]
        fn zero_page_matches_naive(bytes in prop::collection::vec(prop_oneof![9 => Just(0u8), 1 => any::<u8>()], PAGE_SIZE)) {
            let page: [u8; PAGE_SIZE] = bytes.try_into().unwrap();
            prop_assert_eq!(is_zero_page(&page), page.iter().all(|b| *b == 0));
        }
    }

    #[test]
    fn page_hash_differs_on_change() {
        let mut page = [7u8; PAGE_SIZE];
        let a = page_hash(&page);
        assert_eq!(a, page_hash(&page.clone()));
        page[PAGE_SIZE - 1] ^= 1;
        assert_ne!(a, page_hash(&page));
    }

    #[test]
    fn digest_display_and_parse() {
        let d = Digest(0x0123_4567_89ab_cdef_0000_0000_0000_00ff);
        let s = d.to_string();
        assert_eq!(s, "0123456789abcdef00000000000000ff");
        assert_eq!(s.parse::<Digest>(), Ok(d));
        assert_eq!(Digest(1).to_string().len(), 32);
        for bad in [
            "",
            "123",
            "+123456789abcdef00000000000000ff",
            "g123456789abcdef00000000000000ff",
        ] {
            assert_eq!(bad.parse::<Digest>(), Err(ParseDigestError), "{bad:?}");
        }
    }

    /// Throughput of `is_zero_page` against memcpy over the same 256 MiB of
    /// zeros (the worst case: every byte is read). Run with
    /// `cargo test --release -p guestmem -- --ignored --nocapture zero_page_speed`.
    #[test]
    #[ignore]
    fn zero_page_speed() {
        const BYTES: usize = 256 << 20;
        // Not vec![0; n]: calloc'd memory maps the shared zero page, which
        // would make every read hit the same cached 4 KiB.
        let mut src = vec![1u8; BYTES];
        std::hint::black_box(&mut src).fill(0);
        let src = src;
        let mut dst = vec![1u8; BYTES];
        let pages = || {
            src.chunks_exact(PAGE_SIZE)
                .map(|p| <&[u8; PAGE_SIZE]>::try_from(p).unwrap())
        };
        // Fault everything in before timing.
        let mut zero = pages().filter(|p| is_zero_page(p)).count();
        dst.copy_from_slice(&src);

        let rounds = 8;
        let t = Instant::now();
        for _ in 0..rounds {
            zero += pages()
                .filter(|p| is_zero_page(std::hint::black_box(p)))
                .count();
        }
        let zero_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        for _ in 0..rounds {
            dst.copy_from_slice(std::hint::black_box(&src));
        }
        let copy_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let mut naive = 0;
        for _ in 0..rounds {
            naive += pages()
                .filter(|p| std::hint::black_box(p).iter().all(|b| *b == 0))
                .count();
        }
        let naive_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let mut h = 0;
        for _ in 0..rounds {
            h ^= pages()
                .map(|p| page_hash(std::hint::black_box(p)))
                .fold(0, |a, b| a ^ b);
        }
        let hash_s = t.elapsed().as_secs_f64();

        // The same over 256 KiB that stays in L2: compute speed, not DRAM.
        let hot = &src[..256 << 10];
        let hot_rounds = 4096;
        let t = Instant::now();
        let mut hot_zero = 0;
        for _ in 0..hot_rounds {
            hot_zero += hot
                .chunks_exact(PAGE_SIZE)
                .filter(|p| is_zero_page(std::hint::black_box((*p).try_into().unwrap())))
                .count();
        }
        let hot_s = t.elapsed().as_secs_f64();
        assert_eq!(hot_zero, hot_rounds * hot.len() / PAGE_SIZE);
        let mut hot_dst = vec![1u8; hot.len()];
        let t = Instant::now();
        for _ in 0..hot_rounds {
            hot_dst.copy_from_slice(std::hint::black_box(hot));
        }
        let hot_copy_s = t.elapsed().as_secs_f64();
        std::hint::black_box(&hot_dst);
        let hot_gib = (hot_rounds * hot.len()) as f64 / (1u64 << 30) as f64;
        println!(
            "in L2 (256 KiB): is_zero_page {:.1} GiB/s, memcpy {:.1} GiB/s",
            hot_gib / hot_s,
            hot_gib / hot_copy_s
        );

        let gib = (rounds * BYTES) as f64 / (1u64 << 30) as f64;
        assert_eq!(zero, (rounds + 1) * BYTES / PAGE_SIZE);
        assert_eq!(naive, rounds * BYTES / PAGE_SIZE);
        std::hint::black_box((&dst, h));
        println!(
            "256 MiB: is_zero_page {:.1} GiB/s, naive all()==0 {:.1} GiB/s, page_hash {:.1} GiB/s, memcpy {:.1} GiB/s",
            gib / zero_s,
            gib / naive_s,
            gib / hash_s,
            gib / copy_s
        );
    }
}
