//! Frame encoding: little-endian bodies appended straight to the caller's
//! output buffer, header patched in place once the body length is known.

use super::{
    AckWhat, Frame, FrameType, PageSet, HEADER_LEN, MAX_BATCH_PAGES, MAX_MESSAGE_LEN,
    MAX_MISSING_RANGES, MAX_NAME_LEN, MAX_STATE_BYTES,
};
use crate::layout::PAGE_SIZE;

/// A frame that this build refuses to put on the wire because the peer
/// would reject it.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("{field} is {len} bytes, more than {max}")]
    NameTooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("batch of {pages} pages, must be 1..={max}")]
    BatchSize { pages: usize, max: usize },
    #[error("page data is {len} bytes for {pages} pages")]
    DataLength { len: usize, pages: usize },
    #[error("page list offsets must start at 0 and strictly increase")]
    BadOffsets,
    #[error("state blob is {len} bytes, more than {max}")]
    StateTooLarge { len: usize, max: usize },
    #[error("zero run of {count} pages")]
    EmptyZeroRun { count: u64 },
    #[error("zstd compression failed")]
    Compress(#[source] std::io::Error),
    #[error("{crcs} crcs for {pages} delta pages")]
    CrcCount { crcs: usize, pages: usize },
    #[error("compressed deltas of {len} bytes are not smaller than {raw} raw bytes")]
    DeltaTooLarge { len: usize, raw: usize },
    #[error("{count} ranges in one missing-pages frame, more than {max}")]
    TooManyRanges { count: usize, max: usize },
}

/// Encodes frames, compressing page batches with zstd when that makes them
/// smaller. Keeps the zstd context and a scratch buffer between frames.
pub struct Encoder {
    compressor: Option<zstd::bulk::Compressor<'static>>,
    zbuf: Vec<u8>,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder")
            .field("compress", &self.compressor.is_some())
            .finish()
    }
}

impl Encoder {
    /// `zstd_level: None` never compresses; `Some(level)` tries zstd at
    /// that level (1 is the fast default used by sessions).
    pub fn new(zstd_level: Option<i32>) -> Result<Self, EncodeError> {
        let compressor = zstd_level
            .map(zstd::bulk::Compressor::new)
            .transpose()
            .map_err(EncodeError::Compress)?;
        Ok(Self {
            compressor,
            zbuf: Vec::new(),
        })
    }

    pub fn compresses(&self) -> bool {
        self.compressor.is_some()
    }

    /// Appends `frame` to `out`; returns the wire type used (a page batch
    /// goes as `CompressedPageBatch` only when that is smaller).
    pub fn encode(&mut self, frame: &Frame, out: &mut Vec<u8>) -> Result<FrameType, EncodeError> {
        match frame {
            Frame::PageBatch(b) => self.encode_batch(b.pass, &b.set, &b.data.to_bytes(), out),
            other => encode_frame(other, out).map(|()| other.frame_type()),
        }
    }

    /// Appends a page batch for `set` with `data` (the pages in order).
    pub fn encode_batch(
        &mut self,
        pass: u32,
        set: &PageSet,
        data: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<FrameType, EncodeError> {
        check_batch(set, data)?;
        if let Some(c) = self.compressor.as_mut() {
            self.zbuf.clear();
            self.zbuf
                .reserve(zstd::zstd_safe::compress_bound(data.len()));
            let n = c
                .compress_to_buffer(data, &mut self.zbuf)
                .map_err(EncodeError::Compress)?;
            // Only worth it when strictly smaller; the decoder relies on
            // that to bound the compressed input.
            if n < data.len() {
                let start = begin(out, FrameType::CompressedPageBatch);
                put_batch_fixed(out, pass, set);
                out.extend_from_slice(&(n as u32).to_le_bytes());
                out.extend_from_slice(&self.zbuf[..n]);
                put_offsets(out, set);
                finish(out, start);
                return Ok(FrameType::CompressedPageBatch);
            }
        }
        encode_raw_batch(pass, set, data, out);
        Ok(FrameType::PageBatch)
    }
}

fn check_batch(set: &PageSet, data: &[u8]) -> Result<(), EncodeError> {
    let pages = set.len();
    if pages == 0 || pages > MAX_BATCH_PAGES {
        return Err(EncodeError::BatchSize {
            pages,
            max: MAX_BATCH_PAGES,
        });
    }
    if data.len() != pages * PAGE_SIZE {
        return Err(EncodeError::DataLength {
            len: data.len(),
            pages,
        });
    }
    if let PageSet::List { offsets, .. } = set {
        let increasing = offsets.windows(2).all(|w| w[0] < w[1]);
        if offsets.first() != Some(&0) || !increasing {
            return Err(EncodeError::BadOffsets);
        }
    }
    Ok(())
}

fn encode_raw_batch(pass: u32, set: &PageSet, data: &[u8], out: &mut Vec<u8>) {
    let start = begin(out, FrameType::PageBatch);
    put_batch_fixed(out, pass, set);
    out.extend_from_slice(data);
    put_offsets(out, set);
    finish(out, start);
}

/// Writes the 16-byte fixed part shared by both batch types.
pub(crate) fn put_batch_fixed(out: &mut Vec<u8>, pass: u32, set: &PageSet) {
    let (kind, count) = match set {
        PageSet::Run { count, .. } => (0u8, *count as u16),
        PageSet::List { offsets, .. } => (1u8, offsets.len() as u16),
    };
    out.extend_from_slice(&pass.to_le_bytes());
    out.extend_from_slice(&set.first().0.to_le_bytes());
    out.extend_from_slice(&count.to_le_bytes());
    out.push(kind);
    out.push(0);
}

/// Appends a whole `XorPageBatch` frame whose deltas are already
/// compressed into `zdeltas` (strictly smaller than the raw pages; the
/// caller checked).
pub(crate) fn put_xor_batch(
    out: &mut Vec<u8>,
    pass: u32,
    set: &PageSet,
    crcs: &[u32],
    zdeltas: &[u8],
) {
    let start = begin(out, FrameType::XorPageBatch);
    put_batch_fixed(out, pass, set);
    for crc in crcs {
        out.extend_from_slice(&crc.to_le_bytes());
    }
    out.extend_from_slice(&(zdeltas.len() as u32).to_le_bytes());
    out.extend_from_slice(zdeltas);
    put_offsets(out, set);
    finish(out, start);
}

/// Compresses `deltas` for an `XorPageBatch` on a path where no session
/// encoder is at hand (tests, tools); sessions keep their own context.
fn encode_xor_body(b: &super::XorPageBatch, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    check_batch(&b.set, &b.deltas)?;
    if b.crcs.len() != b.set.len() {
        return Err(EncodeError::CrcCount {
            crcs: b.crcs.len(),
            pages: b.set.len(),
        });
    }
    let z = zstd::bulk::compress(&b.deltas, 1).map_err(EncodeError::Compress)?;
    if z.len() >= b.deltas.len() {
        return Err(EncodeError::DeltaTooLarge {
            len: z.len(),
            raw: b.deltas.len(),
        });
    }
    put_batch_fixed(out, b.pass, &b.set);
    for crc in &b.crcs {
        out.extend_from_slice(&crc.to_le_bytes());
    }
    out.extend_from_slice(&(z.len() as u32).to_le_bytes());
    out.extend_from_slice(&z);
    put_offsets(out, &b.set);
    Ok(())
}

pub(crate) fn put_offsets(out: &mut Vec<u8>, set: &PageSet) {
    if let PageSet::List { offsets, .. } = set {
        for o in offsets {
            out.extend_from_slice(&o.to_le_bytes());
        }
    }
}

/// Starts a frame: pushes a header with a zero length and CRC, returns
/// where it starts for [`finish`].
pub(crate) fn begin(out: &mut Vec<u8>, ty: FrameType) -> usize {
    let start = out.len();
    out.extend_from_slice(&[ty as u8, 0, 0, 0]);
    out.extend_from_slice(&[0; 8]);
    start
}

/// Patches length and CRC of the frame started at `start`.
pub(crate) fn finish(out: &mut [u8], start: usize) {
    let body = &out[start + HEADER_LEN..];
    let len = body.len() as u32;
    let crc = crc32fast::hash(body);
    out[start + 4..start + 8].copy_from_slice(&len.to_le_bytes());
    out[start + 8..start + 12].copy_from_slice(&crc.to_le_bytes());
}

/// Patches length and CRC of the frame started at `start` whose body is
/// `prefix || data || suffix`, where `data` (at `data_at..data_at + data.amount()`
/// of `out`) was already hashed into `data` while it was written (page by
/// page, while each page was in cache). Same CRC as [`finish`], one pass
/// over the pages fewer.
pub(crate) fn finish_hashed(
    out: &mut [u8],
    start: usize,
    data_at: usize,
    data: &crc32fast::Hasher,
    data_len: usize,
) {
    let body_at = start + HEADER_LEN;
    let mut crc = crc32fast::Hasher::new();
    crc.update(&out[body_at..data_at]);
    crc.combine(data);
    let mut suffix = crc32fast::Hasher::new();
    suffix.update(&out[data_at + data_len..]);
    crc.combine(&suffix);
    let len = (out.len() - body_at) as u32;
    out[start + 4..start + 8].copy_from_slice(&len.to_le_bytes());
    out[start + 8..start + 12].copy_from_slice(&crc.finalize().to_le_bytes());
}

fn put_str(out: &mut Vec<u8>, field: &'static str, s: &str) -> Result<(), EncodeError> {
    if s.len() > MAX_NAME_LEN {
        return Err(EncodeError::NameTooLong {
            field,
            len: s.len(),
            max: MAX_NAME_LEN,
        });
    }
    out.extend_from_slice(&(s.len() as u16).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

/// Messages are for humans: cut them at a char boundary rather than fail.
fn put_message(out: &mut Vec<u8>, s: &str) {
    let mut end = s.len().min(MAX_MESSAGE_LEN);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    out.extend_from_slice(&(end as u16).to_le_bytes());
    out.extend_from_slice(&s.as_bytes()[..end]);
}

/// Uncompressed encoding of any frame; on error `out` is left as it was.
pub(crate) fn encode_frame(frame: &Frame, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    let start = out.len();
    let r = encode_body(frame, out, start);
    if r.is_err() {
        out.truncate(start);
    }
    r
}

fn encode_body(frame: &Frame, out: &mut Vec<u8>, start: usize) -> Result<(), EncodeError> {
    let at = begin(out, frame.frame_type());
    debug_assert_eq!(at, start);
    match frame {
        Frame::Hello(h) => {
            out.extend_from_slice(&h.version.to_le_bytes());
            out.extend_from_slice(&h.capabilities.0.to_le_bytes());
            out.extend_from_slice(&h.max_streams.to_le_bytes());
            put_str(out, "host", &h.host)?;
            put_str(out, "migration_id", &h.migration_id)?;
            put_str(out, "vm_name", &h.vm_name)?;
            let regions = h.layout.regions();
            out.extend_from_slice(&(regions.len() as u16).to_le_bytes());
            for r in regions {
                out.extend_from_slice(&r.first_pfn.0.to_le_bytes());
                out.extend_from_slice(&r.pages.to_le_bytes());
            }
        }
        Frame::HelloAck(a) => {
            out.extend_from_slice(&a.version.to_le_bytes());
            out.extend_from_slice(&a.capabilities.0.to_le_bytes());
            out.extend_from_slice(&a.max_streams.to_le_bytes());
        }
        Frame::Refuse { code, message } | Frame::Abort { code, message } => {
            out.extend_from_slice(&(*code as u16).to_le_bytes());
            put_message(out, message);
        }
        Frame::PassBegin { pass } => out.extend_from_slice(&pass.to_le_bytes()),
        Frame::PassEnd(e) => {
            out.extend_from_slice(&e.pass.to_le_bytes());
            out.extend_from_slice(&e.pages_sent.to_le_bytes());
            out.extend_from_slice(&e.zero_pages.to_le_bytes());
            out.extend_from_slice(&e.bytes.to_le_bytes());
        }
        Frame::ZeroRun { pass, start, count } => {
            if *count == 0 {
                return Err(EncodeError::EmptyZeroRun { count: *count });
            }
            out.extend_from_slice(&pass.to_le_bytes());
            out.extend_from_slice(&start.0.to_le_bytes());
            out.extend_from_slice(&count.to_le_bytes());
        }
        Frame::State { blob } => {
            if blob.len() > MAX_STATE_BYTES {
                return Err(EncodeError::StateTooLarge {
                    len: blob.len(),
                    max: MAX_STATE_BYTES,
                });
            }
            out.extend_from_slice(blob);
        }
        Frame::PageRequest { id, index, count } => {
            if *count == 0 || *count as usize > MAX_BATCH_PAGES {
                return Err(EncodeError::BatchSize {
                    pages: *count as usize,
                    max: MAX_BATCH_PAGES,
                });
            }
            out.extend_from_slice(&id.to_le_bytes());
            out.extend_from_slice(&index.0.to_le_bytes());
            out.extend_from_slice(&count.to_le_bytes());
        }
        Frame::PageReply { id, index, data } => {
            let pages = data.len() / PAGE_SIZE;
            if pages == 0 || pages > MAX_BATCH_PAGES {
                return Err(EncodeError::BatchSize {
                    pages,
                    max: MAX_BATCH_PAGES,
                });
            }
            if data.len() % PAGE_SIZE != 0 {
                return Err(EncodeError::DataLength {
                    len: data.len(),
                    pages,
                });
            }
            out.extend_from_slice(&id.to_le_bytes());
            out.extend_from_slice(&index.0.to_le_bytes());
            out.extend_from_slice(&(pages as u32).to_le_bytes());
            out.extend_from_slice(data);
        }
        Frame::Switchover { postcopy } => out.push(u8::from(*postcopy)),
        Frame::Done | Frame::Resumed => {}
        Frame::PostcopyReport(r) => {
            out.extend_from_slice(&r.requests.to_le_bytes());
            out.extend_from_slice(&r.p50_us.to_le_bytes());
            out.extend_from_slice(&r.p99_us.to_le_bytes());
            out.extend_from_slice(&r.max_us.to_le_bytes());
            out.push(r.digest as u8);
        }
        Frame::MissingPages { last, ranges } => {
            if ranges.len() > MAX_MISSING_RANGES {
                return Err(EncodeError::TooManyRanges {
                    count: ranges.len(),
                    max: MAX_MISSING_RANGES,
                });
            }
            out.push(u8::from(*last));
            out.extend_from_slice(&(ranges.len() as u32).to_le_bytes());
            for r in ranges {
                out.extend_from_slice(&r.start.0.to_le_bytes());
                out.extend_from_slice(&r.count.to_le_bytes());
            }
        }
        Frame::Ack(what) => {
            let (kind, value) = match what {
                AckWhat::Pass(n) => (1u8, u64::from(*n)),
                AckWhat::State => (2u8, 0),
            };
            out.push(kind);
            out.extend_from_slice(&value.to_le_bytes());
        }
        Frame::XorPageBatch(b) => encode_xor_body(b, out)?,
        Frame::PageBatch(b) => {
            check_batch(&b.set, &b.data.to_bytes())?;
            put_batch_fixed(out, b.pass, &b.set);
            for piece in b.data.pieces() {
                out.extend_from_slice(piece);
            }
            put_offsets(out, &b.set);
        }
    }
    finish(out, start);
    Ok(())
}
