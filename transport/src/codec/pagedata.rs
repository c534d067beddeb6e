//! The data of a raw page batch, possibly in the pieces it arrived in.
//!
//! A batch frame (up to 512 KiB) arrives over QUIC in stream chunks of one
//! datagram each (~6 KB). Copying those into one buffer before writing the
//! pages to guest memory cost a pass over every byte received; the
//! [`FrameBuffer`](super::FrameBuffer) instead keeps the chunks (reference
//! counted, no copy) and the sink writes from them.

use bytes::Bytes;

use crate::layout::PAGE_SIZE;

/// Page bytes, in order: one buffer or several pieces. Compares by content.
#[derive(Clone, Default)]
pub struct PageData {
    pieces: Vec<Bytes>,
    len: usize,
}

impl PageData {
    /// The concatenation of `pieces` (empty pieces are dropped).
    pub fn from_pieces(pieces: Vec<Bytes>) -> Self {
        let pieces: Vec<Bytes> = pieces.into_iter().filter(|p| !p.is_empty()).collect();
        let len = pieces.iter().map(Bytes::len).sum();
        Self { pieces, len }
    }

    /// Bytes in all.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The pieces, in order.
    pub fn pieces(&self) -> &[Bytes] {
        &self.pieces
    }

    /// The bytes as one slice, when they are in one piece.
    pub fn contiguous(&self) -> Option<&[u8]> {
        match self.pieces.as_slice() {
            [] => Some(&[]),
            [one] => Some(one),
            _ => None,
        }
    }

    /// All bytes in one buffer (copied unless already in one piece).
    pub fn to_bytes(&self) -> Bytes {
        match self.pieces.as_slice() {
            [] => Bytes::new(),
            [one] => one.clone(),
            many => {
                let mut v = Vec::with_capacity(self.len);
                for p in many {
                    v.extend_from_slice(p);
                }
                v.into()
            }
        }
    }

    /// See [`PageRuns::for_each_run`].
    pub fn for_each_run<E>(&self, f: impl FnMut(usize, &[u8]) -> Result<(), E>) -> Result<(), E> {
        PageRuns::for_each_run(self, f)
    }

    fn bytes(&self) -> impl Iterator<Item = u8> + '_ {
        self.pieces.iter().flat_map(|p| p.iter().copied())
    }
}

/// Page bytes that can be handed over in runs of whole pages: a
/// [`PageData`], or one slice.
pub(crate) trait PageRuns {
    /// Hands the data over in whole pages: `f(page, bytes)` gets page
    /// number `page` (counted from the first page of the data) and the
    /// whole pages that follow it inside one piece, and every page cut by a
    /// piece boundary gathered into a scratch page on its own. Calls come in
    /// page order and cover every whole page; a partial page at the end is
    /// left out (decoded batches are whole pages). Stops at the first error.
    fn for_each_run<E>(&self, f: impl FnMut(usize, &[u8]) -> Result<(), E>) -> Result<(), E>;

    /// Hands the data over as it lies, with no copy: `f(offset, bytes)`
    /// gets each piece and its byte offset from the start of the data.
    /// Pieces may start and end inside pages. Stops at the first error.
    fn for_each_piece<E>(&self, f: impl FnMut(usize, &[u8]) -> Result<(), E>) -> Result<(), E>;
}

impl PageRuns for [u8] {
    fn for_each_piece<E>(&self, mut f: impl FnMut(usize, &[u8]) -> Result<(), E>) -> Result<(), E> {
        if self.is_empty() {
            return Ok(());
        }
        f(0, self)
    }

    fn for_each_run<E>(&self, mut f: impl FnMut(usize, &[u8]) -> Result<(), E>) -> Result<(), E> {
        let whole = self.len() / PAGE_SIZE * PAGE_SIZE;
        if whole > 0 {
            f(0, &self[..whole])?;
        }
        Ok(())
    }
}

impl PageRuns for PageData {
    fn for_each_piece<E>(&self, mut f: impl FnMut(usize, &[u8]) -> Result<(), E>) -> Result<(), E> {
        let mut offset = 0;
        for piece in &self.pieces {
            f(offset, piece)?;
            offset += piece.len();
        }
        Ok(())
    }

    fn for_each_run<E>(&self, mut f: impl FnMut(usize, &[u8]) -> Result<(), E>) -> Result<(), E> {
        let mut scratch = [0u8; PAGE_SIZE];
        let mut gathered = 0;
        let mut page = 0;
        for piece in &self.pieces {
            let mut rest: &[u8] = piece;
            if gathered > 0 {
                let n = (PAGE_SIZE - gathered).min(rest.len());
                scratch[gathered..gathered + n].copy_from_slice(&rest[..n]);
                gathered += n;
                rest = &rest[n..];
                if gathered < PAGE_SIZE {
                    continue;
                }
                f(page, &scratch)?;
                page += 1;
            }
            let whole = rest.len() / PAGE_SIZE * PAGE_SIZE;
            if whole > 0 {
                f(page, &rest[..whole])?;
                page += whole / PAGE_SIZE;
            }
            let tail = &rest[whole..];
            scratch[..tail.len()].copy_from_slice(tail);
            gathered = tail.len();
        }
        Ok(())
    }
}

impl From<Bytes> for PageData {
    fn from(b: Bytes) -> Self {
        Self::from_pieces(vec![b])
    }
}

impl From<Vec<u8>> for PageData {
    fn from(v: Vec<u8>) -> Self {
        Bytes::from(v).into()
    }
}

impl PartialEq for PageData {
    fn eq(&self, other: &Self) -> bool {
        if self.len != other.len {
            return false;
        }
        match (self.contiguous(), other.contiguous()) {
            (Some(a), Some(b)) => a == b,
            _ => self.bytes().eq(other.bytes()),
        }
    }
}

impl Eq for PageData {}

impl std::fmt::Debug for PageData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageData")
            .field("len", &self.len)
            .field("pieces", &self.pieces.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 4096) as u8).collect()
    }

    fn cut(data: &[u8], sizes: &[usize]) -> PageData {
        let mut pieces = Vec::new();
        let mut at = 0;
        for &s in sizes.iter().cycle() {
            if at >= data.len() {
                break;
            }
            let end = (at + s).min(data.len());
            pieces.push(Bytes::copy_from_slice(&data[at..end]));
            at = end;
        }
        PageData::from_pieces(pieces)
    }

    /// Whatever the cuts, `for_each_run` hands over every page once, in
    /// order, with the right bytes.
    #[test]
    fn runs_cover_every_page_in_order_for_any_cut() {
        let data = pattern(9 * PAGE_SIZE);
        for sizes in [
            &[9 * PAGE_SIZE][..],
            &[5952],
            &[1],
            &[4095, 4097],
            &[PAGE_SIZE],
            &[3 * PAGE_SIZE + 5, 17, 12000],
        ] {
            let d = cut(&data, sizes);
            assert_eq!(d.len(), data.len());
            let mut seen = Vec::new();
            let mut next = 0;
            d.for_each_run(|page, bytes| {
                assert_eq!(page, next, "cut {sizes:?}");
                assert_eq!(bytes.len() % PAGE_SIZE, 0);
                seen.extend_from_slice(bytes);
                next += bytes.len() / PAGE_SIZE;
                Ok::<_, ()>(())
            })
            .unwrap();
            assert!(seen == data, "cut {sizes:?}");
            assert_eq!(d.to_bytes(), Bytes::from(data.clone()));
            assert_eq!(d, PageData::from(data.clone()));
        }
    }

    #[test]
    fn an_error_stops_the_runs() {
        let d = cut(&pattern(4 * PAGE_SIZE), &[100]);
        let mut calls = 0;
        let r = d.for_each_run(|page, _| {
            calls += 1;
            if page == 1 {
                Err(page)
            } else {
                Ok(())
            }
        });
        assert_eq!((r, calls), (Err(1), 2));
    }

    #[test]
    fn content_equality_ignores_the_cuts() {
        let data = pattern(2 * PAGE_SIZE);
        assert_eq!(cut(&data, &[3]), cut(&data, &[5000]));
        let mut other = data.clone();
        other[PAGE_SIZE + 1] ^= 1;
        assert_ne!(cut(&data, &[3]), cut(&other, &[5000]));
        assert_ne!(cut(&data, &[3]), PageData::from(data[..PAGE_SIZE].to_vec()));
    }
}
