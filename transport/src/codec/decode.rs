//! Frame decoding from untrusted bytes: every length is checked against a
//! cap before anything is allocated, and no input makes it panic.
//!
//! Page data is the bulk of what a destination receives, so the receive
//! path avoids copying it: [`FrameBuffer`] reassembles each frame in one
//! buffer sized from its (capped) header, and a decoded raw batch or reply
//! keeps a [`Bytes`] view into that buffer. The only copies left are QUIC's
//! chunk into the frame buffer and the sink's write into guest memory.

use std::cell::RefCell;

use bytes::Bytes;

use super::pool::{BufferPool, POOLED_CAPACITY};
use super::{
    AckWhat, Capabilities, Frame, FrameHeader, FrameType, Hello, HelloAck, PageBatch, PageData,
    PageSet, PassEnd, ReasonCode, XorPageBatch, BATCH_FIXED_LEN, HEADER_LEN, MAX_BATCH_PAGES,
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

fn check_crc(h: &FrameHeader, body: &[u8]) -> Result<(), DecodeError> {
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
struct Reader<'a> {
    buf: &'a [u8],
    ty: FrameType,
    /// The buffer `buf` lies in, when the caller owns it as [`Bytes`]: page
    /// data is then handed out as views into it instead of copies.
    owner: Option<&'a Bytes>,
}

impl<'a> Reader<'a> {
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

    fn end(self) -> Result<(), DecodeError> {
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

fn decode_body(ty: FrameType, body: &[u8], owner: Option<&Bytes>) -> Result<Frame, DecodeError> {
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
            digest: r.u8()?,
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

/// The 16-byte fixed part shared by the batch types: pass, first page,
/// page count (checked to be 1..=128) and set kind.
fn read_batch_fixed(r: &mut Reader<'_>) -> Result<(u32, u64, usize, u8), DecodeError> {
    let pass = r.u32()?;
    let first = r.u64()?;
    let count = usize::from(r.u16()?);
    let kind = r.u8()?;
    let _reserved = r.u8()?;
    check_pages(count)?;
    Ok((pass, first, count, kind))
}

fn decode_batch(r: &mut Reader<'_>, compressed: bool) -> Result<PageBatch, DecodeError> {
    let (pass, first, count, kind) = read_batch_fixed(r)?;
    let raw_len = count * PAGE_SIZE;
    let data = if compressed {
        let zlen = r.u32()? as usize;
        if zlen >= raw_len {
            return Err(DecodeError::CompressedTooLarge {
                len: zlen,
                raw: raw_len,
            });
        }
        Bytes::from(decompress(r.take(zlen)?, raw_len)?)
    } else {
        r.take_bytes(raw_len)?
    };
    let set = decode_set(r, kind, first, count)?;
    Ok(PageBatch {
        pass,
        set,
        data: data.into(),
    })
}

/// Fixed part, `count` CRCs, then the compressed deltas like a compressed
/// batch: `zlen < 4096 × count`, inflated into exactly that many bytes.
fn decode_xor_batch(r: &mut Reader<'_>) -> Result<XorPageBatch, DecodeError> {
    let (pass, first, count, kind) = read_batch_fixed(r)?;
    let crcs: Vec<u32> = r
        .take(count * 4)?
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let raw_len = count * PAGE_SIZE;
    let zlen = r.u32()? as usize;
    if zlen >= raw_len {
        return Err(DecodeError::CompressedTooLarge {
            len: zlen,
            raw: raw_len,
        });
    }
    let deltas = Bytes::from(decompress(r.take(zlen)?, raw_len)?);
    let set = decode_set(r, kind, first, count)?;
    Ok(XorPageBatch {
        pass,
        set,
        crcs,
        deltas,
    })
}

/// The page set of a batch whose fixed part said `kind`, `first` and
/// `count` (already checked to be 1..=128); reads the offsets of a list.
fn decode_set(
    r: &mut Reader<'_>,
    kind: u8,
    first: u64,
    count: usize,
) -> Result<PageSet, DecodeError> {
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

/// Reassembles frames from a byte stream that arrives in arbitrary pieces
/// (one per QUIC stream), copying page data as little as possible:
///
/// * a frame that lies whole inside a pushed chunk is decoded from the
///   chunk itself: its page data is a view into the chunk (QUIC hands out
///   large chunks when the reader lags behind);
/// * a frame split across chunks is assembled in a buffer that gets room
///   for the whole frame (at most its type's cap) once the header is in, and
///   only that frame's bytes are copied into it. A raw page batch or page
///   reply then leaves with that buffer, which returns to this stream's pool
///   when the sink drops the page data.
///
/// No byte is copied twice and nothing is moved around inside a buffer.
#[derive(Debug)]
pub struct FrameBuffer {
    /// The beginning of a frame that is not complete yet; never holds bytes
    /// beyond that frame.
    partial: Vec<u8>,
    /// CRC32 of the body bytes in `partial`, taken as they are copied in
    /// (while in cache) instead of in a second pass over the whole frame.
    crc: crc32fast::Hasher,
    /// What is left of the last chunk pushed.
    chunk: Bytes,
    pool: BufferPool,
    /// A raw page batch being collected as views of the chunks it arrives
    /// in, instead of in `partial`.
    rope: Option<Rope>,
}

/// Header and fixed part, copied before a batch's pages.
const BATCH_HEAD: usize = HEADER_LEN + BATCH_FIXED_LEN;

/// A `PageBatch` frame that spans chunks: its pages are kept as views of
/// the chunks (no copy); the few bytes around them are copied.
#[derive(Debug)]
struct Rope {
    header: FrameHeader,
    /// The frame header and the batch's fixed part.
    head: [u8; BATCH_HEAD],
    pieces: Vec<Bytes>,
    /// Page bytes still to come.
    data_left: usize,
    /// The offsets of a list set, as they come in.
    tail: Vec<u8>,
    tail_len: usize,
    /// Bytes collected so far.
    buffered: usize,
}

impl Rope {
    /// Starts collecting the `PageBatch` whose header is `h` when `chunk`
    /// holds at least its head and the head is consistent with the length.
    /// Anything else (including malformed heads) takes the copying path,
    /// which decodes it and reports exactly what is wrong.
    fn start(h: &FrameHeader, chunk: &[u8]) -> Option<Self> {
        let head: [u8; BATCH_HEAD] = *chunk.first_chunk()?;
        let fixed = &head[HEADER_LEN..];
        let count = usize::from(u16::from_le_bytes([fixed[12], fixed[13]]));
        let tail_len = match fixed[14] {
            0 => 0,
            1 => 4 * count,
            _ => return None,
        };
        let data_len = count * PAGE_SIZE;
        let body_len = BATCH_FIXED_LEN + data_len + tail_len;
        if count == 0 || count > MAX_BATCH_PAGES || body_len != h.body_len as usize {
            return None;
        }
        Some(Self {
            header: *h,
            head,
            pieces: Vec::with_capacity(data_len / 4096 + 2),
            data_left: data_len,
            tail: Vec::new(),
            tail_len,
            buffered: BATCH_HEAD,
        })
    }

    fn is_complete(&self) -> bool {
        self.data_left == 0 && self.tail.len() == self.tail_len
    }

    /// The batch, once complete and its CRC checked.
    fn decode(self) -> Result<Frame, DecodeError> {
        let mut r = Reader {
            buf: &self.head[HEADER_LEN..],
            ty: FrameType::PageBatch,
            owner: None,
        };
        let (pass, first, count, kind) = read_batch_fixed(&mut r)?;
        let mut tail = Reader {
            buf: &self.tail,
            ty: FrameType::PageBatch,
            owner: None,
        };
        let set = decode_set(&mut tail, kind, first, count)?;
        tail.end()?;
        Ok(Frame::PageBatch(PageBatch {
            pass,
            set,
            data: PageData::from_pieces(self.pieces),
        }))
    }
}

impl Default for FrameBuffer {
    fn default() -> Self {
        Self::new()
    }
}

/// Spare frame buffers kept per stream: enough for the frames queued
/// between a reader and the sink.
const POOL_KEEP: usize = 32;

impl FrameBuffer {
    pub fn new() -> Self {
        Self {
            partial: Vec::new(),
            crc: crc32fast::Hasher::new(),
            chunk: Bytes::new(),
            pool: BufferPool::new(POOL_KEEP),
            rope: None,
        }
    }

    /// Appends bytes read from the stream (copying them).
    pub fn push(&mut self, bytes: &[u8]) {
        self.push_chunk(Bytes::copy_from_slice(bytes));
    }

    /// Appends a chunk read from the stream without copying it. Take every
    /// frame with [`next_frame`](Self::next_frame) before pushing the next
    /// chunk; otherwise what is left of the previous one is copied.
    pub fn push_chunk(&mut self, chunk: Bytes) {
        if self.chunk.is_empty() {
            self.chunk = chunk;
        } else {
            let mut joined = Vec::with_capacity(self.chunk.len() + chunk.len());
            joined.extend_from_slice(&self.chunk);
            joined.extend_from_slice(&chunk);
            self.chunk = joined.into();
        }
    }

    /// The next complete frame, if one is buffered. An error is final: the
    /// stream cannot be resynchronised, and what the buffer holds after it
    /// is unspecified.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, DecodeError> {
        if self.rope.is_some() {
            return self.feed_rope();
        }
        if self.partial.is_empty() {
            let Some(h) = peek_header(&self.chunk)? else {
                self.stash(HEADER_LEN);
                return Ok(None);
            };
            let len = h.frame_len();
            if self.chunk.len() >= len {
                let frame = self.chunk.split_to(len);
                let body = &frame[HEADER_LEN..];
                check_crc(&h, body)?;
                return decode_body(h.frame_type, body, Some(&frame)).map(Some);
            }
            if h.frame_type == FrameType::PageBatch {
                if let Some(rope) = Rope::start(&h, &self.chunk) {
                    self.crc.update(&rope.head[HEADER_LEN..]);
                    bytes::Buf::advance(&mut self.chunk, BATCH_HEAD);
                    self.rope = Some(rope);
                    return self.feed_rope();
                }
            }
            // `len` passed the type's cap in peek_header, so this is bounded.
            self.stash(len);
            return Ok(None);
        }
        if self.partial.len() < HEADER_LEN {
            self.fill(HEADER_LEN);
        }
        let Some(h) = peek_header(&self.partial)? else {
            return Ok(None);
        };
        let len = h.frame_len();
        if self.partial.capacity() < len {
            let mut room = self.pool.take(len);
            room.extend_from_slice(&self.partial);
            self.partial = room;
        }
        self.fill(len);
        if self.partial.len() < len {
            return Ok(None);
        }
        let actual = std::mem::take(&mut self.crc).finalize();
        if actual != h.crc {
            return Err(DecodeError::BadCrc {
                expected: h.crc,
                actual,
            });
        }
        if h.frame_type == FrameType::PageBatch || h.frame_type == FrameType::PageReply {
            // The page data stays where it is; the buffer goes with it.
            let frame = self.pool.bytes(std::mem::take(&mut self.partial));
            decode_body(h.frame_type, &frame[HEADER_LEN..], Some(&frame)).map(Some)
        } else {
            let frame = decode_body(h.frame_type, &self.partial[HEADER_LEN..], None);
            if self.partial.capacity() > POOLED_CAPACITY {
                // A state blob's buffer (up to 64 MiB) is not kept around.
                self.partial = Vec::new();
            } else {
                self.partial.clear();
            }
            frame.map(Some)
        }
    }

    /// Takes what the rope still needs from the chunk (pages as views,
    /// offsets copied), hashing it on the way; the batch once complete.
    fn feed_rope(&mut self) -> Result<Option<Frame>, DecodeError> {
        let Some(rope) = self.rope.as_mut() else {
            return Ok(None);
        };
        if rope.data_left > 0 && !self.chunk.is_empty() {
            let piece = self.chunk.split_to(rope.data_left.min(self.chunk.len()));
            self.crc.update(&piece);
            rope.data_left -= piece.len();
            rope.buffered += piece.len();
            rope.pieces.push(piece);
        }
        if rope.data_left == 0 && rope.tail.len() < rope.tail_len {
            let n = (rope.tail_len - rope.tail.len()).min(self.chunk.len());
            self.crc.update(&self.chunk[..n]);
            rope.tail.extend_from_slice(&self.chunk[..n]);
            rope.buffered += n;
            bytes::Buf::advance(&mut self.chunk, n);
        }
        if !rope.is_complete() {
            return Ok(None);
        }
        let Some(rope) = self.rope.take() else {
            return Ok(None);
        };
        let actual = std::mem::take(&mut self.crc).finalize();
        if actual != rope.header.crc {
            return Err(DecodeError::BadCrc {
                expected: rope.header.crc,
                actual,
            });
        }
        rope.decode().map(Some)
    }

    /// Starts assembling a frame of `len` bytes (or a header, when the
    /// length is not known yet) from what is left of the chunk.
    fn stash(&mut self, len: usize) {
        if self.chunk.is_empty() {
            return;
        }
        if self.partial.capacity() < len {
            self.partial = self.pool.take(len);
        }
        self.fill(len);
    }

    /// Moves bytes from the chunk to the partial frame until it is `len`
    /// bytes long or the chunk is used up.
    fn fill(&mut self, len: usize) {
        let n = len.saturating_sub(self.partial.len()).min(self.chunk.len());
        let piece = &self.chunk[..n];
        // Only body bytes count; the header comes first.
        if let Some(body) = piece.get(HEADER_LEN.saturating_sub(self.partial.len())..) {
            self.crc.update(body);
        }
        self.partial.extend_from_slice(piece);
        bytes::Buf::advance(&mut self.chunk, n);
    }

    /// Bytes buffered but not yet decoded.
    pub fn pending(&self) -> usize {
        self.partial.len() + self.chunk.len() + self.rope.as_ref().map_or(0, |r| r.buffered)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::PageSet;

    fn batch_frame(pages: usize, fill: u8) -> Vec<u8> {
        Frame::PageBatch(PageBatch {
            pass: 3,
            set: PageSet::Run {
                first: PageIndex(5),
                count: pages as u32,
            },
            data: vec![fill; pages * PAGE_SIZE].into(),
        })
        .to_bytes()
        .unwrap()
    }

    #[test]
    fn frame_split_across_chunks_is_assembled_once() {
        let mut wire = batch_frame(4, 0xAB);
        let second = batch_frame(1, 0xCD);
        wire.extend_from_slice(&second);
        let mut fb = FrameBuffer::new();
        fb.push(&wire[..5]);
        assert!(fb.next_frame().unwrap().is_none());
        fb.push(&wire[5..HEADER_LEN + 1]);
        assert!(fb.next_frame().unwrap().is_none());
        // Room for the whole first frame was made once the header was in.
        let base = fb.partial.as_ptr();
        assert!(fb.partial.capacity() >= HEADER_LEN + 16 + 4 * PAGE_SIZE);
        let mut frames = Vec::new();
        for piece in wire[HEADER_LEN + 1..].chunks(1000) {
            fb.push(piece);
            while let Some(f) = fb.next_frame().unwrap() {
                frames.push(f);
            }
        }
        assert_eq!(fb.pending(), 0);
        let [Frame::PageBatch(b), Frame::PageBatch(c)] = &frames[..] else {
            panic!("expected two page batches, got {frames:?}");
        };
        assert!(b.data.to_bytes().iter().all(|&x| x == 0xAB));
        assert_eq!(b.data.len(), 4 * PAGE_SIZE);
        assert_eq!(
            b.data.contiguous().map(<[u8]>::as_ptr),
            Some(base.wrapping_add(HEADER_LEN + 16)),
            "page data is a view into the buffer the frame was assembled in"
        );
        assert!(c.data.to_bytes().iter().all(|&x| x == 0xCD));
        assert_eq!(c.data.len(), PAGE_SIZE);
    }

    #[test]
    fn frames_inside_one_chunk_are_not_copied() {
        let mut wire = batch_frame(2, 0x11);
        wire.extend_from_slice(&batch_frame(1, 0x22));
        let tail = batch_frame(1, 0x33);
        wire.extend_from_slice(&tail[..100]);
        let chunk = Bytes::from(wire);
        let base = chunk.as_ptr();
        let mut fb = FrameBuffer::new();
        fb.push_chunk(chunk);
        let Some(Frame::PageBatch(a)) = fb.next_frame().unwrap() else {
            panic!("expected a page batch");
        };
        assert_eq!(
            a.data.contiguous().map(<[u8]>::as_ptr),
            Some(base.wrapping_add(HEADER_LEN + 16))
        );
        let Some(Frame::PageBatch(b)) = fb.next_frame().unwrap() else {
            panic!("expected a page batch");
        };
        let second_at = HEADER_LEN + 16 + 2 * PAGE_SIZE;
        assert_eq!(
            b.data.contiguous().map(<[u8]>::as_ptr),
            Some(base.wrapping_add(second_at + HEADER_LEN + 16))
        );
        assert!(b.data.to_bytes().iter().all(|&x| x == 0x22));
        // The cut-off third frame waits for the rest.
        assert!(fb.next_frame().unwrap().is_none());
        assert_eq!(fb.pending(), 100);
        fb.push(&tail[100..]);
        let Some(Frame::PageBatch(c)) = fb.next_frame().unwrap() else {
            panic!("expected the third batch");
        };
        assert!(c.data.to_bytes().iter().all(|&x| x == 0x33));
        assert_eq!(fb.pending(), 0);
    }

    /// A batch spanning chunks (the usual case: a datagram is ~6 KB, a
    /// batch up to 512 KiB) keeps its pages where the chunks hold them.
    #[test]
    fn batch_spanning_chunks_is_kept_as_views_of_the_chunks() {
        let data: Vec<u8> = (0..3 * PAGE_SIZE).map(|i| (i % 251) as u8).collect();
        let frame = Frame::PageBatch(PageBatch {
            pass: 2,
            set: PageSet::List {
                first: PageIndex(10),
                offsets: vec![0, 5, 9],
            },
            data: data.clone().into(),
        });
        let mut wire = frame.to_bytes().unwrap();
        wire.extend_from_slice(&batch_frame(1, 0x44));
        let chunks: Vec<Bytes> = wire.chunks(5952).map(Bytes::copy_from_slice).collect();
        let mut fb = FrameBuffer::new();
        let mut frames = Vec::new();
        for c in &chunks {
            fb.push_chunk(c.clone());
            while let Some(f) = fb.next_frame().unwrap() {
                frames.push(f);
            }
        }
        assert_eq!(fb.pending(), 0);
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[0], frame);
        let Frame::PageBatch(b) = &frames[0] else {
            panic!("expected a page batch");
        };
        let pieces = b.data.pieces();
        assert_eq!(pieces.len(), 3);
        assert_eq!(
            pieces[0].as_ptr(),
            chunks[0].as_ptr().wrapping_add(HEADER_LEN + 16)
        );
        assert_eq!(pieces[1].as_ptr(), chunks[1].as_ptr());
        assert!(b.data.contiguous().is_none());
    }

    #[test]
    fn bad_crc_in_a_batch_spanning_chunks_is_caught() {
        let mut wire = batch_frame(3, 0x55);
        wire[HEADER_LEN + 16 + PAGE_SIZE + 7] ^= 0x10;
        let mut fb = FrameBuffer::new();
        let mut result = Ok(None);
        for c in wire.chunks(5000) {
            fb.push_chunk(Bytes::copy_from_slice(c));
            result = fb.next_frame();
            if result.is_err() {
                break;
            }
        }
        assert!(
            matches!(result, Err(DecodeError::BadCrc { .. })),
            "{result:?}"
        );
    }

    #[test]
    fn frame_buffer_reports_bad_crc_before_decoding() {
        let mut wire = batch_frame(1, 1);
        let last = wire.len() - 1;
        wire[last] ^= 1;
        let mut fb = FrameBuffer::new();
        fb.push(&wire);
        assert!(matches!(fb.next_frame(), Err(DecodeError::BadCrc { .. })));
    }
}
