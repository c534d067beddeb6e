//! Reassembly of frames from a stream's chunks, keeping page data where it
//! arrived.
//!
//! Page data is the bulk of what a destination receives, so the receive
//! path avoids copying it: [`FrameBuffer`] reassembles each frame in one
//! buffer sized from its (capped) header, or, for a raw page batch that
//! spans chunks, as a [`Rope`] of views of those chunks; a decoded raw batch
//! or reply keeps [`Bytes`] views instead of copies. The only copies left
//! are QUIC's chunk into the frame buffer and the sink's write into guest
//! memory.

use bytes::Bytes;

use super::decode::{check_crc, decode_body, decode_set, read_batch_fixed, BatchFixed, Reader};
use super::pool::{BufferPool, POOLED_CAPACITY};
use super::{peek_header, DecodeError, Frame, FrameHeader, FrameType, PageBatch, PageData};
use super::{BATCH_FIXED_LEN, HEADER_LEN};
use crate::layout::PAGE_SIZE;

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
    /// The batch's fixed part, read from its head.
    fixed: BatchFixed,
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
        let head: &[u8; BATCH_HEAD] = chunk.first_chunk()?;
        let mut r = Reader::new(&head[HEADER_LEN..], FrameType::PageBatch);
        let fixed = read_batch_fixed(&mut r).ok()?;
        let tail_len = match fixed.kind {
            0 => 0,
            1 => 4 * fixed.count,
            _ => return None,
        };
        let data_len = fixed.count * PAGE_SIZE;
        if BATCH_FIXED_LEN + data_len + tail_len != h.body_len as usize {
            return None;
        }
        Some(Self {
            header: *h,
            fixed,
            pieces: Vec::with_capacity(data_len / PAGE_SIZE + 2),
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
        let mut tail = Reader::new(&self.tail, FrameType::PageBatch);
        let set = decode_set(&mut tail, &self.fixed)?;
        tail.end()?;
        Ok(Frame::PageBatch(PageBatch {
            pass: self.fixed.pass,
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
                    self.crc.update(&self.chunk[HEADER_LEN..BATCH_HEAD]);
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
    use crate::layout::PageIndex;

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
