//! Property tests of the wire codec: round trips for every frame type, and
//! that arbitrary, truncated or corrupted bytes never panic the decoder.

use proptest::prelude::*;
use transport::codec::{
    decode, AckWhat, Capabilities, DecodeError, Encoder, Frame, FrameBuffer, FrameType, Hello,
    HelloAck, PageBatch, PageSet, PassEnd, ReasonCode, XorPageBatch, HEADER_LEN, MAX_BATCH_PAGES,
};
use transport::layout::{MemoryLayout, PageIndex, Pfn, Region, PAGE_SIZE};
use transport::testing::Rng;

/// Deterministic page bytes from a seed (xorshift), with a tunable share of
/// repeated bytes so some batches compress and some do not.
fn pages(n: usize, seed: u64, compressible: bool) -> Vec<u8> {
    let mut rng = Rng(seed | 1);
    let mut v = Vec::with_capacity(n * PAGE_SIZE);
    for _ in 0..n * PAGE_SIZE / 8 {
        let x = rng.next();
        let w = if compressible { x & 0x0f } else { x };
        v.extend_from_slice(&w.to_le_bytes());
    }
    v
}

fn arb_layout() -> impl Strategy<Value = MemoryLayout> {
    prop::collection::vec((0u64..1000, 1u64..5000), 1..5).prop_map(|parts| {
        let mut next = 0;
        let regions = parts
            .into_iter()
            .map(|(gap, pages)| {
                let r = Region {
                    first_pfn: Pfn(next + gap),
                    pages,
                };
                next += gap + pages;
                r
            })
            .collect();
        MemoryLayout::new(regions).expect("generated layout is valid")
    })
}

fn arb_code() -> impl Strategy<Value = ReasonCode> {
    prop::sample::select(&ReasonCode::ALL[..])
}

fn arb_set() -> impl Strategy<Value = PageSet> {
    prop_oneof![
        (any::<u32>(), 1..=MAX_BATCH_PAGES as u32).prop_map(|(first, count)| PageSet::Run {
            first: PageIndex(u64::from(first)),
            count,
        }),
        (
            any::<u32>(),
            prop::collection::btree_set(1u32..100_000, 0..8)
        )
            .prop_map(|(first, rest)| PageSet::List {
                first: PageIndex(u64::from(first)),
                offsets: std::iter::once(0).chain(rest).collect(),
            }),
    ]
}

fn arb_batch() -> impl Strategy<Value = PageBatch> {
    (any::<u32>(), arb_set(), any::<u64>(), any::<bool>()).prop_map(|(pass, set, seed, c)| {
        // Keep the page count small so each case stays fast.
        let set = match set {
            PageSet::Run { first, count } => PageSet::Run {
                first,
                count: count.min(4),
            },
            s => s,
        };
        let data = pages(set.len(), seed, c).into();
        PageBatch { pass, set, data }
    })
}

/// Sparse deltas (a few changed bytes per page, as dirtying leaves them),
/// so they compress below the raw size as the encoder requires.
fn arb_xor() -> impl Strategy<Value = XorPageBatch> {
    (
        any::<u32>(),
        arb_set(),
        prop::collection::vec((any::<u16>(), 1u8..=255), 1..6),
        any::<u32>(),
    )
        .prop_map(|(pass, set, changes, crc_seed)| {
            let set = match set {
                PageSet::Run { first, count } => PageSet::Run {
                    first,
                    count: count.min(4),
                },
                s => s,
            };
            let n = set.len();
            let mut deltas = vec![0u8; n * PAGE_SIZE];
            for (at, v) in changes {
                let i = usize::from(at) * 37 % deltas.len();
                deltas[i] = v;
            }
            let crcs = (0..n as u32)
                .map(|i| crc_seed.wrapping_mul(i + 1))
                .collect();
            XorPageBatch {
                pass,
                set,
                crcs,
                deltas: deltas.into(),
            }
        })
}

fn arb_frame() -> impl Strategy<Value = Frame> {
    let name = "[a-z0-9.-]{0,40}";
    prop_oneof![
        (
            any::<u16>(),
            any::<u32>(),
            any::<u16>(),
            name,
            name,
            name,
            arb_layout()
        )
            .prop_map(|(version, caps, max_streams, host, id, vm, layout)| {
                Frame::Hello(Hello {
                    version,
                    capabilities: Capabilities(caps),
                    max_streams,
                    host,
                    migration_id: id,
                    vm_name: vm,
                    layout,
                })
            }),
        (any::<u16>(), any::<u32>(), any::<u16>()).prop_map(|(version, c, max_streams)| {
            Frame::HelloAck(HelloAck {
                version,
                capabilities: Capabilities(c),
                max_streams,
            })
        }),
        (arb_code(), "\\PC{0,60}").prop_map(|(code, message)| Frame::Refuse { code, message }),
        (arb_code(), "\\PC{0,60}").prop_map(|(code, message)| Frame::Abort { code, message }),
        any::<u32>().prop_map(|pass| Frame::PassBegin { pass }),
        (any::<u32>(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(pass, p, z, b)| {
            Frame::PassEnd(PassEnd {
                pass,
                pages_sent: p,
                zero_pages: z,
                bytes: b,
            })
        }),
        (any::<u32>(), any::<u32>(), 1u64..1 << 28).prop_map(|(pass, start, count)| {
            Frame::ZeroRun {
                pass,
                start: PageIndex(u64::from(start)),
                count,
            }
        }),
        arb_batch().prop_map(Frame::PageBatch),
        arb_xor().prop_map(Frame::XorPageBatch),
        prop::collection::vec(any::<u8>(), 0..3000).prop_map(|blob| Frame::State { blob }),
        (any::<u64>(), any::<u32>(), 1..=MAX_BATCH_PAGES as u32).prop_map(|(id, i, count)| {
            Frame::PageRequest {
                id,
                index: PageIndex(u64::from(i)),
                count,
            }
        }),
        (any::<u64>(), any::<u32>(), 1usize..4, any::<u64>()).prop_map(|(id, i, n, seed)| {
            Frame::PageReply {
                id,
                index: PageIndex(u64::from(i)),
                data: pages(n, seed, false).into(),
            }
        }),
        any::<bool>().prop_map(|postcopy| Frame::Switchover { postcopy }),
        Just(Frame::Done),
        any::<u32>().prop_map(|n| Frame::Ack(AckWhat::Pass(n))),
        Just(Frame::Ack(AckWhat::State)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn encode_decode_round_trip(frame in arb_frame()) {
        let bytes = frame.to_bytes().unwrap();
        let (back, used) = decode(&bytes).unwrap().expect("complete frame");
        prop_assert_eq!(used, bytes.len());
        prop_assert_eq!(back, frame);
    }

    #[test]
    fn compressing_encoder_round_trips(batch in arb_batch(), level in 1i32..4) {
        let mut enc = Encoder::new(Some(level)).unwrap();
        let frame = Frame::PageBatch(batch);
        let mut out = vec![0xAA; 3]; // encoding appends after existing bytes
        let ty = enc.encode(&frame, &mut out).unwrap();
        prop_assert_eq!(&out[..3], &[0xAA; 3]);
        prop_assert_eq!(out[3], ty as u8);
        let raw_len = frame.to_bytes().unwrap().len();
        if ty == FrameType::CompressedPageBatch {
            prop_assert!(out.len() - 3 < raw_len, "compressed only when smaller");
        }
        let (back, used) = decode(&out[3..]).unwrap().expect("complete frame");
        prop_assert_eq!(used, out.len() - 3);
        prop_assert_eq!(back, frame);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let _ = decode(&bytes);
        let mut fb = FrameBuffer::new();
        fb.push(&bytes);
        while let Ok(Some(_)) = fb.next_frame() {}
    }

    #[test]
    fn arbitrary_body_with_valid_header_never_panics(
        ty in 0u8..20,
        body in prop::collection::vec(any::<u8>(), 0..600),
    ) {
        let mut bytes = vec![ty, 0, 0, 0];
        bytes.extend_from_slice(&(body.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        bytes.extend_from_slice(&body);
        match decode(&bytes) {
            Ok(Some((_, used))) => prop_assert_eq!(used, bytes.len()),
            Ok(None) => prop_assert!(false, "a whole frame is never incomplete"),
            Err(e) => {
                let crc_error = matches!(e, DecodeError::BadCrc { .. });
                prop_assert!(!crc_error, "crc was computed over this body");
            }
        }
    }

    #[test]
    fn truncated_frame_is_incomplete(frame in arb_frame(), cut in any::<prop::sample::Index>()) {
        let bytes = frame.to_bytes().unwrap();
        let len = cut.index(bytes.len());
        prop_assert!(matches!(decode(&bytes[..len]), Ok(None)), "prefix of {} / {}", len, bytes.len());
    }

    #[test]
    fn body_bit_flip_is_bad_crc(frame in arb_frame(), at in any::<prop::sample::Index>(), bit in 0u8..8) {
        let mut bytes = frame.to_bytes().unwrap();
        prop_assume!(bytes.len() > HEADER_LEN);
        let i = HEADER_LEN + at.index(bytes.len() - HEADER_LEN);
        bytes[i] ^= 1 << bit;
        let r = decode(&bytes);
        prop_assert!(matches!(r, Err(DecodeError::BadCrc { .. })), "{:?}", r.map(|o| o.map(|f| f.1)));
        prop_assert_eq!(r.unwrap_err().reason(), ReasonCode::BadCrc);
    }

    #[test]
    fn batches_outside_layout_are_rejected(layout in arb_layout(), batch in arb_batch()) {
        let total = layout.total_pages();
        let set = &batch.set;
        let inside = set.first().0 + set.span() <= total;
        let frame = Frame::PageBatch(batch.clone());
        let r = frame.check_layout(&layout);
        prop_assert_eq!(r.is_ok(), inside);
        if let Err(e) = r {
            prop_assert!(e.index >= total || e.index >= set.first().0);
        }
        // Moving the batch past the end is always rejected.
        let moved = PageBatch {
            set: match batch.set {
                PageSet::Run { count, .. } => PageSet::Run { first: PageIndex(total), count },
                PageSet::List { offsets, .. } => PageSet::List {
                    first: PageIndex(total - 1),
                    offsets: if offsets.len() > 1 { offsets } else { vec![0, 1] },
                },
            },
            ..batch
        };
        let moved = Frame::PageBatch(PageBatch {
            data: pages(moved.set.len(), 1, true).into(),
            ..moved
        });
        prop_assert!(moved.check_layout(&layout).is_err());
    }

    #[test]
    fn frame_buffer_reassembles_any_split(frames in prop::collection::vec(arb_frame(), 1..6), chunk in 1usize..5000) {
        let mut bytes = Vec::new();
        for f in &frames {
            f.encode(&mut bytes).unwrap();
        }
        let mut fb = FrameBuffer::new();
        let mut got = Vec::new();
        for piece in bytes.chunks(chunk) {
            fb.push(piece);
            while let Some(f) = fb.next_frame().unwrap() {
                got.push(f);
            }
        }
        prop_assert_eq!(fb.pending(), 0);
        prop_assert_eq!(got, frames);
    }

    /// The CRC of a frame that arrives in pieces is taken piece by piece;
    /// a flipped body bit is still caught, wherever the pieces are cut.
    #[test]
    fn frame_buffer_rejects_a_flipped_body_bit_in_any_split(
        frame in arb_frame(),
        chunk in 1usize..5000,
        bit in any::<prop::sample::Index>(),
    ) {
        let mut bytes = Vec::new();
        frame.encode(&mut bytes).unwrap();
        prop_assume!(bytes.len() > 12);
        let b = 12 * 8 + bit.index((bytes.len() - 12) * 8);
        bytes[b / 8] ^= 1 << (b % 8);
        let mut fb = FrameBuffer::new();
        let mut result = Ok(None);
        for piece in bytes.chunks(chunk) {
            fb.push(piece);
            result = fb.next_frame();
            if result.is_err() {
                break;
            }
        }
        prop_assert!(
            matches!(result, Err(DecodeError::BadCrc { .. })),
            "{:?}", result
        );
    }
}

fn frame_bytes(ty: FrameType, body: &[u8]) -> Vec<u8> {
    let mut b = vec![ty as u8, 0, 0, 0];
    b.extend_from_slice(&(body.len() as u32).to_le_bytes());
    b.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    b.extend_from_slice(body);
    b
}

fn batch_fixed(count: u16) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&0u32.to_le_bytes());
    body.extend_from_slice(&0u64.to_le_bytes());
    body.extend_from_slice(&count.to_le_bytes());
    body.extend_from_slice(&[0, 0]);
    body
}

#[test]
fn zstd_bomb_is_capped_at_claimed_size() {
    // 1 page claimed, but the zstd stream inflates to 1 MiB of zeros.
    let bomb = zstd::bulk::compress(&vec![0u8; 1 << 20], 3).unwrap();
    assert!(bomb.len() < PAGE_SIZE);
    let mut body = batch_fixed(1);
    body.extend_from_slice(&(bomb.len() as u32).to_le_bytes());
    body.extend_from_slice(&bomb);
    let err = decode(&frame_bytes(FrameType::CompressedPageBatch, &body)).unwrap_err();
    assert!(matches!(err, DecodeError::Decompress(_)), "{err:?}");
    assert_eq!(err.reason(), ReasonCode::BadFrame);
}

#[test]
fn short_zstd_output_is_rejected() {
    let half = zstd::bulk::compress(&vec![7u8; PAGE_SIZE], 3).unwrap();
    let mut body = batch_fixed(2);
    body.extend_from_slice(&(half.len() as u32).to_le_bytes());
    body.extend_from_slice(&half);
    let err = decode(&frame_bytes(FrameType::CompressedPageBatch, &body)).unwrap_err();
    assert!(
        matches!(
            err,
            DecodeError::DecompressedSize {
                expected: 8192,
                actual: 4096
            }
        ),
        "{err:?}"
    );
}

#[test]
fn oversized_length_is_rejected_from_the_header_alone() {
    // Only the header is present: the length alone must be refused.
    let mut h = vec![FrameType::PageBatch as u8, 0, 0, 0];
    h.extend_from_slice(&u32::MAX.to_le_bytes());
    h.extend_from_slice(&[0; 4]);
    assert!(matches!(
        decode(&h),
        Err(DecodeError::BodyTooLong {
            ty: FrameType::PageBatch,
            ..
        })
    ));
    let mut h = vec![FrameType::Done as u8, 0, 0, 0];
    h.extend_from_slice(&5000u32.to_le_bytes());
    h.extend_from_slice(&[0; 4]);
    assert!(matches!(decode(&h), Err(DecodeError::BodyTooLong { .. })));
}

#[test]
fn header_reserved_bits_and_type_are_checked() {
    let mut b = Frame::Done.to_bytes().unwrap();
    b[1] = 1;
    assert!(matches!(decode(&b), Err(DecodeError::ReservedBits { .. })));
    let mut b = Frame::Done.to_bytes().unwrap();
    b[0] = 200;
    assert!(matches!(
        decode(&b),
        Err(DecodeError::UnknownType { ty: 200 })
    ));
}

#[test]
fn bad_page_lists_are_rejected() {
    for offsets in [vec![1u32, 2], vec![0, 0], vec![0, 5, 3]] {
        let n = offsets.len() as u16;
        let mut body = batch_fixed(n);
        body[14] = 1; // list kind
        body.extend_from_slice(&vec![1u8; usize::from(n) * PAGE_SIZE]);
        for o in &offsets {
            body.extend_from_slice(&o.to_le_bytes());
        }
        let err = decode(&frame_bytes(FrameType::PageBatch, &body)).unwrap_err();
        assert!(
            matches!(err, DecodeError::BadOffsets),
            "{offsets:?}: {err:?}"
        );
    }
    // More pages than the cap, and zero pages.
    for count in [0u16, MAX_BATCH_PAGES as u16 + 1] {
        let err = decode(&frame_bytes(FrameType::PageBatch, &batch_fixed(count))).unwrap_err();
        assert!(matches!(err, DecodeError::BatchSize { .. }), "{err:?}");
    }
}

#[test]
fn trailing_bytes_are_rejected() {
    let mut body = 7u32.to_le_bytes().to_vec();
    body.push(0);
    let err = decode(&frame_bytes(FrameType::PassBegin, &body)).unwrap_err();
    assert!(matches!(err, DecodeError::TrailingBytes { extra: 1, .. }));
}

/// An `XorPageBatch` body for `n` pages of run kind with `z` as the zstd
/// data.
fn xor_body(n: u16, z: &[u8], zlen: u32) -> Vec<u8> {
    let mut body = batch_fixed(n);
    for _ in 0..n {
        body.extend_from_slice(&0u32.to_le_bytes());
    }
    body.extend_from_slice(&zlen.to_le_bytes());
    body.extend_from_slice(z);
    body
}

#[test]
fn xor_delta_bomb_and_oversized_deltas_are_rejected() {
    let bomb = zstd::bulk::compress(&vec![0u8; 1 << 20], 3).unwrap();
    let err = decode(&frame_bytes(
        FrameType::XorPageBatch,
        &xor_body(1, &bomb, bomb.len() as u32),
    ))
    .unwrap_err();
    assert!(matches!(err, DecodeError::Decompress(_)), "{err:?}");
    // Compressed deltas must be smaller than the pages.
    let big = vec![0u8; PAGE_SIZE];
    let err = decode(&frame_bytes(
        FrameType::XorPageBatch,
        &xor_body(1, &big, PAGE_SIZE as u32),
    ))
    .unwrap_err();
    assert!(
        matches!(
            err,
            DecodeError::CompressedTooLarge {
                len: 4096,
                raw: 4096
            }
        ),
        "{err:?}"
    );
    // A claimed zlen past the body is short, not an allocation.
    let err = decode(&frame_bytes(
        FrameType::XorPageBatch,
        &xor_body(2, &[1, 2, 3], 8000),
    ))
    .unwrap_err();
    assert!(matches!(err, DecodeError::BodyTooShort { .. }), "{err:?}");
    // Deltas that inflate to fewer bytes than the pages.
    let half = zstd::bulk::compress(&vec![7u8; PAGE_SIZE], 3).unwrap();
    let err = decode(&frame_bytes(
        FrameType::XorPageBatch,
        &xor_body(2, &half, half.len() as u32),
    ))
    .unwrap_err();
    assert!(
        matches!(
            err,
            DecodeError::DecompressedSize {
                expected: 8192,
                actual: 4096
            }
        ),
        "{err:?}"
    );
    // The header cap is checked before the body is read.
    let mut h = vec![FrameType::XorPageBatch as u8, 0, 0, 0];
    h.extend_from_slice(&(transport::codec::MAX_XOR_BATCH_BODY as u32 + 1).to_le_bytes());
    h.extend_from_slice(&[0; 4]);
    assert!(matches!(decode(&h), Err(DecodeError::BodyTooLong { .. })));
}

#[test]
fn xor_delta_list_offsets_are_checked() {
    let z = zstd::bulk::compress(&vec![0u8; 2 * PAGE_SIZE], 1).unwrap();
    let mut body = xor_body(2, &z, z.len() as u32);
    body[14] = 1; // list kind
    for o in [0u32, 0] {
        body.extend_from_slice(&o.to_le_bytes());
    }
    let err = decode(&frame_bytes(FrameType::XorPageBatch, &body)).unwrap_err();
    assert!(matches!(err, DecodeError::BadOffsets), "{err:?}");
}

#[test]
fn incompressible_or_miscounted_deltas_are_not_encoded() {
    let random = pages(1, 42, false);
    let frame = Frame::XorPageBatch(XorPageBatch {
        pass: 1,
        set: PageSet::Run {
            first: PageIndex(0),
            count: 1,
        },
        crcs: vec![0],
        deltas: random.into(),
    });
    assert!(matches!(
        frame.to_bytes(),
        Err(transport::codec::EncodeError::DeltaTooLarge { .. })
    ));
    let frame = Frame::XorPageBatch(XorPageBatch {
        pass: 1,
        set: PageSet::Run {
            first: PageIndex(0),
            count: 2,
        },
        crcs: vec![0],
        deltas: vec![0u8; 2 * PAGE_SIZE].into(),
    });
    assert!(matches!(
        frame.to_bytes(),
        Err(transport::codec::EncodeError::CrcCount { crcs: 1, pages: 2 })
    ));
}
