//! Frame decoding from untrusted bytes: every length is checked against a
//! cap before anything is allocated, and no input makes it panic.
//!
//! A body decoded from a buffer the caller owns as [`Bytes`] hands out its
//! page data as views into it; [`FrameBuffer`](super::FrameBuffer) builds
//! on that to keep the receive path free of page copies.

use std::cell::RefCell;

use bytes::Bytes;

use super::{
    AckWhat, Capabilities, Frame, FrameHeader, FrameType, Hello, HelloAck, PageBatch, PageSet,
    PassEnd, PostcopyDigest, ReasonCode, XorPageBatch, HEADER_LEN, MAX_BATCH_PAGES,
    MAX_MESSAGE_LEN, MAX_MISSING_RANGES, MAX_NAME_LEN,
};
use crate::layout::{
    LayoutError, MemoryLayout, PageIndex, PageRange, Pfn, Region, MAX_GUEST_PAGES, MAX_REGIONS,
    PAGE_SIZE,
};

/// Why bytes from a peer are not a valid frame.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("unknown frame type {ty}")]
    UnknownType { ty: u8 },
    #[error("reserved header bits set (flags {flags:#x}, reserved {reserved:#x})")]
    ReservedBits { flags: u8, reserved: u16 },
    #[error("{ty:?} body of {len} bytes exceeds {max}")]
    BodyTooLong { ty: FrameType, len: u32, max: usize },
    #[error("body crc {actual:#010x} does not match header {expected:#010x}")]
    BadCrc { expected: u32, actual: u32 },
    #[error("{ty:?} body too short")]
    BodyTooShort { ty: FrameType },
    #[error("{ty:?} body has {extra} trailing bytes")]
    TrailingBytes { ty: FrameType, extra: usize },
    #[error("{field} of {len} bytes exceeds {max}")]
    StringTooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{field} is not utf-8")]
    BadUtf8 { field: &'static str },
    #[error("hello has {count} regions, more than {max}")]
    TooManyRegions { count: usize, max: usize },
    #[error("invalid memory layout in hello")]
    BadLayout(#[source] LayoutError),
    #[error("{pages} pages in a batch, must be 1..={max}")]
    BatchSize { pages: usize, max: usize },
    #[error("page data of {len} bytes is not whole pages")]
    PartialPage { len: usize },
    #[error("page list offsets must start at 0 and strictly increase")]
    BadOffsets,
    #[error("unknown page set kind {kind}")]
    BadSetKind { kind: u8 },
    #[error("page range overflows the index space")]
    IndexOverflow,
    #[error("zero run of {count} pages, must be 1..={max}")]
    ZeroRunSize { count: u64, max: u64 },
    #[error("compressed batch of {len} bytes is not smaller than its {raw} raw bytes")]
    CompressedTooLarge { len: usize, raw: usize },
    #[error("zstd decompression failed")]
    Decompress(#[source] std::io::Error),
    #[error("batch decompressed to {actual} bytes, expected {expected}")]
    DecompressedSize { expected: usize, actual: usize },
    #[error("unknown ack kind {kind}")]
    BadAckKind { kind: u8 },
    #[error("invalid switchover mode {mode}")]
    BadSwitchover { mode: u8 },
    #[error("missing-pages frame with {count} ranges, more than {max}")]
    TooManyRanges { count: usize, max: usize },
    #[error("missing-page ranges must be non-empty, sorted and not overlap")]
    BadRanges,
    #[error("unknown post-copy digest result {value}")]
    BadPostcopyDigest { value: u8 },
}

impl DecodeError {
    /// The abort code to send to the peer that sent these bytes.
    pub fn reason(&self) -> ReasonCode {
        match self {
            DecodeError::BadCrc { .. } => ReasonCode::BadCrc,
            _ => ReasonCode::BadFrame,
        }
    }
}

/// Reads and checks a frame header: `Ok(None)` until 12 bytes are there.
/// Lets a driver learn how many bytes the whole frame needs (at most the
/// type's cap) before reading them.
pub fn peek_header(buf: &[u8]) -> Result<Option<FrameHeader>, DecodeError> {
    let Some(h) = buf.first_chunk::<HEADER_LEN>() else {
        return Ok(None);
    };
    let ty = FrameType::from_u8(h[0]).ok_or(DecodeError::UnknownType { ty: h[0] })?;
    let reserved = u16::from_le_bytes([h[2], h[3]]);
    if h[1] != 0 || reserved != 0 {
        return Err(DecodeError::ReservedBits {
            flags: h[1],
            reserved,
        });
    }
    let body_len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
    if body_len as usize > ty.max_body() {
        return Err(DecodeError::BodyTooLong {
            ty,
            len: body_len,
            max: ty.max_body(),
        });
    }
    Ok(Some(FrameHeader {
        frame_type: ty,
        body_len,
        crc: u32::from_le_bytes([h[8], h[9], h[10], h[11]]),
    }))
}

/// Decodes one frame from the front of `buf`.
///
/// `Ok(None)`: more bytes are needed. `Ok(Some((frame, n)))`: the frame and
/// the bytes it used. `Err`: the bytes are not a valid frame; the stream
/// cannot be resynchronised and the migration should abort with
/// [`DecodeError::reason`].
///
/// Page data of the decoded frame is copied out of `buf`; a driver that owns
/// its bytes uses [`FrameBuffer`], which avoids that copy.
pub fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>, DecodeError> {
    let Some(h) = peek_header(buf)? else {
        return Ok(None);
    };
    let Some(body) = buf.get(HEADER_LEN..h.frame_len()) else {
        return Ok(None);
    };
    check_crc(&h, body)?;
    let frame = decode_body(h.frame_type, body, None)?;
    Ok(Some((frame, h.frame_len())))
}

pub(super) fn check_crc(h: &FrameHeader, body: &[u8]) -> Result<(), DecodeError> {
    let actual = crc32fast::hash(body);
    if actual != h.crc {
        return Err(DecodeError::BadCrc {
            expected: h.crc,
            actual,
        });
    }
    Ok(())
}

/// Cursor over a body; running out of bytes is `BodyTooShort`.
pub(super) struct Reader<'a> {
    buf: &'a [u8],
    ty: FrameType,
    /// The buffer `buf` lies in, when the caller owns it as [`Bytes`]: page
    /// data is then handed out as views into it instead of copies.
    owner: Option<&'a Bytes>,
}

impl<'a> Reader<'a> {
    /// A cursor over `buf`, a body (or part of one) of type `ty`, whose
    /// page data is copied out.
    pub(super) fn new(buf: &'a [u8], ty: FrameType) -> Self {
        Self {
            buf,
            ty,
            owner: None,
        }
    }

    /// The next `n` bytes as [`Bytes`], shared with the owner if there is
    /// one.
    fn take_bytes(&mut self, n: usize) -> Result<Bytes, DecodeError> {
        let owner = self.owner;
        let part = self.take(n)?;
        Ok(match owner {
            // `part` was cut from `buf`, which lies inside `owner`, so
            // slice_ref's containment check holds.
            Some(owner) => owner.slice_ref(part),
            None => Bytes::copy_from_slice(part),
        })
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::BodyTooShort { ty: self.ty });
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let (head, rest) = self
            .buf
            .split_first_chunk::<N>()
            .ok_or(DecodeError::BodyTooShort { ty: self.ty })?;
        self.buf = rest;
        Ok(*head)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        self.array().map(u16::from_le_bytes)
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        self.array().map(u64::from_le_bytes)
    }

    fn string(&mut self, field: &'static str, max: usize) -> Result<String, DecodeError> {
        let len = usize::from(self.u16()?);
        if len > max {
            return Err(DecodeError::StringTooLong { field, len, max });
        }
        let bytes = self.take(len)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| DecodeError::BadUtf8 { field })
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    pub(super) fn end(self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes {
                ty: self.ty,
                extra: self.buf.len(),
            })
        }
    }
}

pub(super) fn decode_body(
    ty: FrameType,
    body: &[u8],
    owner: Option<&Bytes>,
) -> Result<Frame, DecodeError> {
    let mut r = Reader {
        buf: body,
        ty,
        owner,
    };
    let frame = match ty {
        FrameType::Hello => Frame::Hello(decode_hello(&mut r)?),
        FrameType::HelloAck => Frame::HelloAck(HelloAck {
            version: r.u16()?,
            capabilities: Capabilities(r.u32()?),
            max_streams: r.u16()?,
        }),
        FrameType::Refuse => Frame::Refuse {
            code: ReasonCode::from_u16(r.u16()?),
            message: r.string("message", MAX_MESSAGE_LEN)?,
        },
        FrameType::Abort => Frame::Abort {
            code: ReasonCode::from_u16(r.u16()?),
            message: r.string("message", MAX_MESSAGE_LEN)?,
        },
        FrameType::PassBegin => Frame::PassBegin { pass: r.u32()? },
        FrameType::PassEnd => Frame::PassEnd(PassEnd {
            pass: r.u32()?,
            pages_sent: r.u64()?,
            zero_pages: r.u64()?,
            bytes: r.u64()?,
        }),
        FrameType::ZeroRun => {
            let pass = r.u32()?;
            let start = r.u64()?;
            let count = r.u64()?;
            if count == 0 || count > MAX_GUEST_PAGES {
                return Err(DecodeError::ZeroRunSize {
                    count,
                    max: MAX_GUEST_PAGES,
                });
            }
            start.checked_add(count).ok_or(DecodeError::IndexOverflow)?;
            Frame::ZeroRun {
                pass,
                start: PageIndex(start),
                count,
            }
        }
        FrameType::PageBatch | FrameType::CompressedPageBatch => {
            Frame::PageBatch(decode_batch(&mut r, ty == FrameType::CompressedPageBatch)?)
        }
        FrameType::XorPageBatch => Frame::XorPageBatch(decode_xor_batch(&mut r)?),
        FrameType::State => Frame::State {
            blob: r.rest().to_vec(),
        },
        FrameType::PageRequest => {
            let id = r.u64()?;
            let index = r.u64()?;
            let count = r.u32()?;
            check_pages(count as usize)?;
            index
                .checked_add(u64::from(count))
                .ok_or(DecodeError::IndexOverflow)?;
            Frame::PageRequest {
                id,
                index: PageIndex(index),
                count,
            }
        }
        FrameType::PageReply => {
            let id = r.u64()?;
            let index = r.u64()?;
            let count = r.u32()? as usize;
            check_pages(count)?;
            index
                .checked_add(count as u64)
                .ok_or(DecodeError::IndexOverflow)?;
            Frame::PageReply {
                id,
                index: PageIndex(index),
                data: r.take_bytes(count * PAGE_SIZE)?,
            }
        }
        FrameType::Switchover => match r.u8()? {
            0 => Frame::Switchover { postcopy: false },
            1 => Frame::Switchover { postcopy: true },
            mode => return Err(DecodeError::BadSwitchover { mode }),
        },
        FrameType::Done => Frame::Done,
        FrameType::Resumed => Frame::Resumed,
        FrameType::PostcopyReport => Frame::PostcopyReport(super::PostcopyReport {
            requests: r.u64()?,
            p50_us: r.u32()?,
            p99_us: r.u32()?,
            max_us: r.u32()?,
            digest: {
                let value = r.u8()?;
                PostcopyDigest::from_u8(value).ok_or(DecodeError::BadPostcopyDigest { value })?
            },
        }),
        FrameType::MissingPages => decode_missing(&mut r)?,
        FrameType::Ack => {
            let kind = r.u8()?;
            let value = r.u64()?;
            match (kind, u32::try_from(value)) {
                (1, Ok(n)) => Frame::Ack(AckWhat::Pass(n)),
                (2, _) if value == 0 => Frame::Ack(AckWhat::State),
                _ => return Err(DecodeError::BadAckKind { kind }),
            }
        }
    };
    r.end()?;
    Ok(frame)
}

/// `last` (0/1), a range count, then `(start u64, count u64)` pairs. The
/// count is checked against the cap and the body length before allocating.
fn decode_missing(r: &mut Reader<'_>) -> Result<Frame, DecodeError> {
    let last = match r.u8()? {
        0 => false,
        1 => true,
        _ => return Err(DecodeError::BadRanges),
    };
    let count = r.u32()? as usize;
    if count > MAX_MISSING_RANGES {
        return Err(DecodeError::TooManyRanges {
            count,
            max: MAX_MISSING_RANGES,
        });
    }
    if r.buf.len() != count * 16 {
        return Err(DecodeError::BodyTooShort { ty: r.ty });
    }
    let mut ranges = Vec::with_capacity(count);
    let mut prev_end = 0u64;
    for _ in 0..count {
        let start = r.u64()?;
        let n = r.u64()?;
        let end = start.checked_add(n).ok_or(DecodeError::IndexOverflow)?;
        if n == 0 || n > MAX_GUEST_PAGES || start < prev_end {
            return Err(DecodeError::BadRanges);
        }
        prev_end = end;
        ranges.push(PageRange::new(start, n));
    }
    Ok(Frame::MissingPages { last, ranges })
}

fn check_pages(pages: usize) -> Result<(), DecodeError> {
    if pages == 0 || pages > MAX_BATCH_PAGES {
        return Err(DecodeError::BatchSize {
            pages,
            max: MAX_BATCH_PAGES,
        });
    }
    Ok(())
}

fn decode_hello(r: &mut Reader<'_>) -> Result<Hello, DecodeError> {
    let version = r.u16()?;
    let capabilities = Capabilities(r.u32()?);
    let max_streams = r.u16()?;
    let host = r.string("host", MAX_NAME_LEN)?;
    let migration_id = r.string("migration_id", MAX_NAME_LEN)?;
    let vm_name = r.string("vm_name", MAX_NAME_LEN)?;
    let count = usize::from(r.u16()?);
    if count > MAX_REGIONS {
        return Err(DecodeError::TooManyRegions {
            count,
            max: MAX_REGIONS,
        });
    }
    let mut regions = Vec::with_capacity(count);
    for _ in 0..count {
        regions.push(Region {
            first_pfn: Pfn(r.u64()?),
            pages: r.u64()?,
        });
    }
    let layout = MemoryLayout::new(regions).map_err(DecodeError::BadLayout)?;
    Ok(Hello {
        version,
        capabilities,
        max_streams,
        host,
        migration_id,
        vm_name,
        layout,
    })
}

/// The 16-byte fixed part shared by the batch types.
#[derive(Clone, Copy, Debug)]
pub(super) struct BatchFixed {
    pub(super) pass: u32,
    pub(super) first: u64,
    /// Pages in the batch, checked to be 1..=128.
    pub(super) count: usize,
    /// 0: a run, 1: a list of offsets (follows the page data).
    pub(super) kind: u8,
}

/// Reads a batch's fixed part: pass, first page, page count and set kind.
pub(super) fn read_batch_fixed(r: &mut Reader<'_>) -> Result<BatchFixed, DecodeError> {
    let pass = r.u32()?;
    let first = r.u64()?;
    let count = usize::from(r.u16()?);
    let kind = r.u8()?;
    let _reserved = r.u8()?;
    check_pages(count)?;
    Ok(BatchFixed {
        pass,
        first,
        count,
        kind,
    })
}

fn decode_batch(r: &mut Reader<'_>, compressed: bool) -> Result<PageBatch, DecodeError> {
    let fixed = read_batch_fixed(r)?;
    let raw_len = fixed.count * PAGE_SIZE;
    let data = if compressed {
        read_compressed(r, raw_len)?
    } else {
        r.take_bytes(raw_len)?
    };
    Ok(PageBatch {
        pass: fixed.pass,
        set: decode_set(r, &fixed)?,
        data: data.into(),
    })
}

/// Fixed part, `count` CRCs, then the compressed deltas like a compressed
/// batch: `zlen < 4096 × count`, inflated into exactly that many bytes.
fn decode_xor_batch(r: &mut Reader<'_>) -> Result<XorPageBatch, DecodeError> {
    let fixed = read_batch_fixed(r)?;
    let crcs: Vec<u32> = r
        .take(fixed.count * 4)?
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let deltas = read_compressed(r, fixed.count * PAGE_SIZE)?;
    Ok(XorPageBatch {
        pass: fixed.pass,
        set: decode_set(r, &fixed)?,
        crcs,
        deltas,
    })
}

/// A zstd length and frame that must inflate to exactly `raw_len` bytes;
/// the frame must be strictly smaller than that, which also bounds what a
/// decompression bomb can claim.
fn read_compressed(r: &mut Reader<'_>, raw_len: usize) -> Result<Bytes, DecodeError> {
    let zlen = r.u32()? as usize;
    if zlen >= raw_len {
        return Err(DecodeError::CompressedTooLarge {
            len: zlen,
            raw: raw_len,
        });
    }
    Ok(Bytes::from(decompress(r.take(zlen)?, raw_len)?))
}

/// The page set of a batch with this fixed part (its count already
/// checked to be 1..=128); reads the offsets of a list.
pub(super) fn decode_set(r: &mut Reader<'_>, fixed: &BatchFixed) -> Result<PageSet, DecodeError> {
    let BatchFixed {
        first, count, kind, ..
    } = *fixed;
    let set = match kind {
        0 => PageSet::Run {
            first: PageIndex(first),
            count: count as u32,
        },
        1 => {
            let bytes = r.take(count * 4)?;
            let offsets: Vec<u32> = bytes
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            let increasing = offsets.windows(2).all(|w| w[0] < w[1]);
            if offsets.first() != Some(&0) || !increasing {
                return Err(DecodeError::BadOffsets);
            }
            PageSet::List {
                first: PageIndex(first),
                offsets,
            }
        }
        kind => return Err(DecodeError::BadSetKind { kind }),
    };
    first
        .checked_add(set.span())
        .ok_or(DecodeError::IndexOverflow)?;
    Ok(set)
}

thread_local! {
    /// One zstd context per thread: creating one per batch would cost more
    /// than decompressing a small batch.
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { RefCell::new(None) };
}

/// Decompresses into a buffer of exactly the claimed size, so a
/// decompression bomb fails with "destination too small" instead of
/// allocating.
fn decompress(src: &[u8], raw_len: usize) -> Result<Vec<u8>, DecodeError> {
    let mut out = Vec::with_capacity(raw_len);
    let n = DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        let d = match slot.as_mut() {
            Some(d) => d,
            None => slot.insert(zstd::bulk::Decompressor::new().map_err(DecodeError::Decompress)?),
        };
        d.decompress_to_buffer(src, &mut out)
            .map_err(DecodeError::Decompress)
    })?;
    if n != raw_len {
        return Err(DecodeError::DecompressedSize {
            expected: raw_len,
            actual: n,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::PostcopyReport;

    #[test]
    fn postcopy_report_with_an_unknown_digest_result_is_refused() {
        let report = Frame::PostcopyReport(PostcopyReport {
            requests: 7,
            p50_us: 10,
            p99_us: 20,
            max_us: 30,
            digest: PostcopyDigest::Mismatched,
        });
        let mut wire = report.to_bytes().unwrap();
        assert_eq!(decode(&wire).unwrap(), Some((report, wire.len())));
        // The digest result is the body's last byte; re-seal the CRC so
        // only the value is wrong.
        let last = wire.len() - 1;
        wire[last] = 3;
        let crc = crc32fast::hash(&wire[HEADER_LEN..]);
        wire[8..12].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            decode(&wire),
            Err(DecodeError::BadPostcopyDigest { value: 3 })
        ));
    }
}
